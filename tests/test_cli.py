"""Every CLI subcommand end to end on tiny data, and the one-line errors for bad input."""
import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import vaelab
from vaelab import runs
from vaelab.cli import build_parser, main
from vaelab.config import TrainConfig
from vaelab.errors import ConfigError, DataError
from vaelab.prepare import prepare_data
from vaelab.reports import _report_device

TINY = ["--hidden", "16", "--latent-dim", "3", "--epochs", "2", "--batch-size", "32", "--quiet"]


@pytest.fixture(scope="module")
def npz_data(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=rng.integers(0, 256, (120, 8, 8), dtype=np.uint8), y=rng.integers(0, 4, 120))
    return f"npz:{path}"


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, npz_data):
    out = tmp_path_factory.mktemp("runs") / "vae"
    assert main(["train", "--data", npz_data, "--binarize", "dynamic", *TINY, "--out", str(out)]) == 0
    return out


def test_train_writes_config_metrics_checkpoints_and_report(vae_run):
    for name in ("config.json", "metrics.jsonl", "report.html", "evaluation.json", "figures/samples.png",
                 "figures/latent_map.png", "figures/traversals.png", "figures/interpolations.png",
                 "figures/reconstructions.png", "figures/training_curves.png"):
        assert (vae_run / name).exists(), name
    page = (vae_run / "report.html").read_text()
    for model in ("pca", "ae", "vae"):
        assert f"<td>{model}</td>" in page
    assert runs.is_complete(vae_run / "baselines" / "ae") and runs.is_complete(vae_run / "baselines" / "pca")
    config = json.loads((vae_run / "config.json").read_text())
    assert config["model"]["hidden"] == [16] and config["data"]["binarize"] == "dynamic"


def test_report_says_which_baselines_it_trains_and_where(npz_data, tmp_path, capsys):
    """The baselines' epoch lines followed the run's own, the same words and numbers, with nothing to tell that
    another model was training."""
    out = tmp_path / "run"
    assert main(["train", "--data", npz_data, *TINY, "--no-report", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    err = capsys.readouterr().err
    for name in ("pca", "ae"):
        assert f"training the {name} baseline for the report's table (latent 3) in {out / 'baselines' / name} " \
               "(--no-baselines skips it)" in err
    assert err.index("training the ae baseline") < err.index("epoch 1/")
    assert main(["report", str(out)]) == 0  # trained once: nothing to announce the second time
    assert "baseline" not in capsys.readouterr().err
    # the run trains on; a report without training baselines shows them as they are, saying for how long
    assert main(["train", "--resume", "--out", str(out), "--epochs", "3", "--quiet", "--no-report"]) == 0
    assert main(["report", str(out), "--no-baselines"]) == 0
    page = (out / "report.html").read_text()
    assert "<td>ae</td><td>3</td><td>2</td>" in page and "<td>vae</td><td>3</td><td>3</td>" in page
    assert "<td>pca</td><td>3</td><td></td>" in page  # PCA has no epochs
    assert main(["report", str(out)]) == 0 and "<td>ae</td><td>3</td><td>3</td>" in (out / "report.html").read_text()


def test_a_gpu_run_reports_on_a_machine_without_one(npz_data, tmp_path, capsys, monkeypatch):
    """The baselines took the run's --device cuda from its config.json: on a CPU-only machine the report failed
    ("--device cuda was asked for but torch sees no CUDA device"), and `report --device` was ignored. The report
    runs where the run trained when the machine has that device, else on the CPU, with a note."""
    out = tmp_path / "run"
    assert main(["train", "--data", npz_data, *TINY, "--no-report", "--out", str(out)]) == 0
    stored = json.loads((out / "config.json").read_text())
    stored["train"]["device"] = "cuda"  # as trained on a GPU
    (out / "config.json").write_text(json.dumps(stored))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    assert main(["report", str(out), "--quiet"]) == 0
    assert f"vaelab: note: {out} trained on cuda, which this machine lacks: the report runs on the CPU" in \
        capsys.readouterr().err
    assert json.loads((out / "baselines" / "ae" / "config.json").read_text())["train"]["device"] == "cpu"
    assert main(["report", str(out), "--device", "cuda"]) == 2  # asked for, and not there: refused, not ignored
    assert "device cuda was asked for but torch sees no CUDA device" in capsys.readouterr().err


def test_a_run_on_a_second_gpu_reports_on_the_first_of_a_one_gpu_machine(tmp_path, capsys, monkeypatch):
    """A run trained with --device cuda:1 fell back to the CPU on a machine with one GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _report_device(tmp_path, "cuda:0") == "cuda:0"
    assert _report_device(tmp_path, "cuda:1") == "cuda:0"
    assert (f"{tmp_path} trained on cuda:1, which this machine lacks: the report runs on cuda:0"
            in capsys.readouterr().err)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _report_device(tmp_path, "cuda:1") == "cpu"


@pytest.mark.parametrize("n", [3, 8, 20, 130])
def test_small_data_sets_train_and_report(tmp_path, capsys, n):
    """After training, the report failed on small test splits: 13 test images (of 130) made an odd number of
    interpolation ends, and fewer images brought more failures: a PCA baseline with more components than
    training images, one test code (its spread, its 2-D map) and probes of one class."""
    rng = np.random.default_rng(0)
    data = tmp_path / "small.npz"
    np.savez(data, x=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), y=rng.integers(0, 3, n))
    out = tmp_path / "run"
    assert main(["train", "--data", f"npz:{data}", "--hidden", "16", "--epochs", "1", "--quiet",
                 "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert (out / "figures" / "latent_map.png").exists() and "<td>ae</td>" in page
    train_size = n - 2 * max(1, round(0.1 * n))  # n = 20: 16, as many as --latent-dim, which PCA can have
    assert ("none: PCA has at most" in page) == (train_size < 16)
    if n == 8:  # PCA itself is refused in one line (it was a shape error from copying 6 components into 16)
        err = run_error(["train", "--data", f"npz:{data}", "--model", "pca", "--quiet", "--out", str(tmp_path / "p")],
                        capsys)
        assert "--latent-dim 16: PCA of" in err and "lower --latent-dim or give more data" in err


def test_evaluate_sample_reconstruct_interpolate_report(vae_run, tmp_path, capsys):
    assert main(["evaluate", str(vae_run)]) == 0
    result = json.loads((vae_run / "evaluation.json").read_text())
    assert result["test_loss"] == pytest.approx(result["test_recon"] + result["test_kl"])
    assert result["test_elbo"] == -result["test_loss"]
    assert main(["sample", str(vae_run), "--n", "6", "--nrow", "3", "--out", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").size[0] > 8 * 3
    assert main(["reconstruct", str(vae_run), "--n", "4", "--out", str(tmp_path / "r.png")]) == 0
    assert main(["interpolate", str(vae_run), "--a", "0", "--b", "3", "--steps", "5",
                 "--out", str(tmp_path / "i.png")]) == 0
    assert main(["report", str(vae_run), "--no-baselines", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "written" in out and "report:" in out


def test_evaluate_takes_one_importance_sample(vae_run, tmp_path):
    """--k 1 is the smallest importance sample and the IWAE bound's K = 1 case, the ELBO: refusing it (a mutant
    of the --k check, < 1 read as <= 1) passed test_cli.py."""
    run = shutil.copytree(vae_run, tmp_path / "run")  # (evaluation.json of the shared run stays as it is)
    assert main(["evaluate", str(run), "--nll", "--k", "1", "--no-probe"]) == 0
    result = json.loads((run / "evaluation.json").read_text())
    assert result["nll_k"] == 1
    assert abs(result["nll"] - result["test_loss"]) < 3 * result["nll_stderr"]  # both one-sample ELBO estimates


def test_the_ends_of_the_commands_ranges_are_taken(vae_run, tmp_path):
    """Each range was tested beyond its ends only: random mutants of cli.py that refused an end passed."""
    run = shutil.copytree(vae_run, tmp_path / "run")  # (evaluation.json of the shared run stays as it is)
    for argv in (["sample", "--n", "1", "--nrow", "1"], ["sample", "--n", "10000"], ["reconstruct", "--n", "1"],
                 ["reconstruct", "--n", "100"], ["interpolate", "--steps", "2"], ["interpolate", "--steps", "100"],
                 ["evaluate", "--nll", "--k", "2", "--chunk", "1", "--no-probe"]):
        out = [] if argv[0] == "evaluate" else ["--out", str(tmp_path / "picture.png")]
        assert main([argv[0], str(run), *argv[1:], *out]) == 0, argv


@pytest.fixture
def saved_grids(monkeypatch) -> dict:
    """figures.save_grid records (images, nrow) under the file's name instead of writing a picture."""
    from vaelab import figures

    grids = {}

    def record(images, path, *, nrow):
        grids[Path(path).name] = (images, nrow)
        return path

    monkeypatch.setattr(figures, "save_grid", record)
    return grids


def test_reconstruct_and_interpolate_draw_the_test_images_asked_for(vae_run, tmp_path, saved_grids):
    """Both commands were checked by their exit status alone: an interpolation between no images (an empty slice
    for --a) wrote a blank picture and passed."""
    model = vaelab.load(vae_run)
    test_x = prepare_data(runs.load_config(vae_run)).test.x
    assert main(["reconstruct", str(vae_run), "--n", "4", "--out", str(tmp_path / "r.png")]) == 0
    images, nrow = saved_grids["r.png"]
    assert nrow == 4 and len(images) == 8  # originals on top, reconstructions below
    torch.testing.assert_close(images[:4], test_x[:4])
    torch.testing.assert_close(images[4:], model.reconstruct(test_x[:4]))
    assert main(["interpolate", str(vae_run), "--a", "2", "--b", "-1", "--steps", "5",
                 "--out", str(tmp_path / "i.png")]) == 0
    images, nrow = saved_grids["i.png"]
    assert nrow == 5 and len(images) == 5  # the line from test image 2's code to the last one's, in 5 steps
    torch.testing.assert_close(images[[0, -1]], model.reconstruct(test_x[[2, -1]]))


def test_sample_seed_decides_the_draws(vae_run, tmp_path):
    """--seed was never varied: a sample command that ignored it passed every test."""

    def sample(seed, name):
        out = tmp_path / name
        assert main(["sample", str(vae_run), "--n", "6", "--seed", str(seed), "--out", str(out)]) == 0
        return np.asarray(Image.open(out))

    torch.manual_seed(123)  # the global generator elsewhere than --seed leaves it, so only --seed can repeat draws
    first = sample(7, "a.png")
    torch.manual_seed(456)
    assert np.array_equal(sample(7, "b.png"), first)
    assert not np.array_equal(sample(8, "c.png"), first)


def test_resume_extends_a_run(vae_run, npz_data, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(["train", "--data", npz_data, *TINY, "--out", str(out), "--no-report"]) == 0
    assert main(["train", "--resume", "--out", str(out), "--epochs", "4", "--quiet", "--no-report"]) == 0
    assert [r["epoch"] for r in runs.read_metrics(out)] == [1, 2, 3, 4]
    for epochs in ("3", "4"):  # fewer epochs than done, or as many
        assert main(["train", "--resume", "--out", str(out), "--epochs", epochs, "--quiet", "--no-report"]) == 0
        assert f"is at epoch 4 already (--epochs {epochs}): nothing to train" in capsys.readouterr().out
    assert len(runs.read_metrics(out)) == 4
    # and the run keeps its settings: they read --epochs 3 and this --lr, as if trained with them
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2", "--lr", "0.5", "--no-report"]) == 0
    assert runs.load_config(out).train.epochs == 4 and runs.load_config(out).train.lr != 0.5
    assert "spreads" not in capsys.readouterr().err  # no schedule note for a schedule that does not run


def test_resuming_a_pca_run_says_there_is_nothing_to_continue(npz_data, tmp_path, capsys):
    """PCA is fitted in closed form: --resume said "resuming after epoch 1", fitted it again, "trained pca"."""
    out = tmp_path / "pca"
    assert main(["train", "--data", npz_data, "--model", "pca", "--latent-dim", "2", "--quiet", "--no-report",
                 "--out", str(out)]) == 0
    weights = (runs.latest_checkpoint(out).path / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--epochs", "3", "--no-report"]) == 0
    captured = capsys.readouterr()
    assert "holds a fitted PCA (closed form, no epochs to continue): nothing to train" in captured.out
    assert "after epoch" not in captured.err + captured.out  # (the trainer's "resuming RUN after epoch 1")
    assert (runs.latest_checkpoint(out).path / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("model", ["pca", "ae"])
def test_train_baseline_models(npz_data, tmp_path, model):
    out = tmp_path / model
    nets = ["--likelihood", "gaussian", "--net", "conv", "--hidden", "4,8"] if model == "ae" else []  # PCA: none
    assert main(["train", "--data", npz_data, "--model", model, *nets, "--latent-dim", "2", "--epochs", "1",
                 "--quiet", "--no-baselines", "--out", str(out)]) == 0
    assert (out / "report.html").exists()
    assert "samples" not in (out / "report.html").read_text()  # no prior to sample from


@pytest.mark.parametrize("labelled", [True, False])
def test_the_map_of_one_dimensional_codes_is_a_strip_with_a_row_per_label(tmp_path, monkeypatch, labelled):
    """With --latent-dim 1 the map drew every class on the line z2 = 0, over each other, under an axis "z2"."""
    from vaelab import figures

    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig))
    codes, labels = torch.linspace(-1, 1, 60)[:, None], torch.arange(60) % 3
    figures.latent_map(codes, labels if labelled else None, tmp_path / "map.png", classes=("a", "b", "c"))
    ax = saved[0].axes[0]
    ys = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections])
    xs = np.concatenate([c.get_offsets()[:, 0] for c in ax.collections])
    assert sorted(xs.tolist()) == pytest.approx(codes[:, 0].tolist())  # z1 across, as it is
    if labelled:
        for k, collection in enumerate(ax.collections):  # one row per class, jittered within it
            rows = collection.get_offsets()[:, 1]
            assert np.all(np.abs(rows - k) <= 0.3) and rows.std() > 0.05
        assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"] and ax.get_ylabel() == "label"
    else:
        assert ys.std() > 0.05 and ax.get_ylabel() == "" and not ax.get_yticks().size
    saved.clear()
    figures.latent_map(torch.randn(30, 2), labels[:30], tmp_path / "map.png")  # two dimensions: z1 and z2
    assert saved[0].axes[0].get_ylabel() == "z2"


@pytest.mark.parametrize("dims", [1, 2])
def test_class_names_are_drawn_as_they_are(tmp_path, monkeypatch, dims):
    """A pair of "$" in a folder's class name was parsed as TeX (a parse error stopped the report), a name
    starting with "_" was left out of the legend, and a long one took over the figure."""
    import matplotlib.pyplot as plt

    from vaelab import figures

    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig) or fig.savefig(path))
    classes = ("a$\\frac{1}{$b", "_hidden", "x" * 100)
    figures.latent_map(torch.randn(30, dims), torch.arange(30) % 3, tmp_path / "map.png", classes=classes)
    ax = saved[0].axes[0]
    shown = ax.get_yticklabels() if dims == 1 else ax.get_legend().get_texts()
    assert [t.get_text() for t in shown] == ["a\\$\\frac{1}{\\$b", "_hidden", "x" * 39 + "\u2026"]
    assert (tmp_path / "map.png").stat().st_size > 0
    plt.close(saved[0])


def test_interpolations_end_at_the_codes_and_traversals_move_one_dimension_around_one(vae_run):
    """Nothing checked the pictures' contents: interior points only, or traversals not centred on the image's
    code, passed every test."""
    from vaelab import figures

    model = vaelab.load(vae_run)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        ends = model.decode(model.embed(x)).mean
        strip = figures.interpolations(model, x[:2], x[1:3], steps=5)  # rows (x0 -> x1), (x1 -> x2)
        torch.testing.assert_close(strip[[0, 4, 5, 9]], ends[[0, 1, 1, 2]])
        z0, scale = model.embed(x[:1])[0], torch.tensor([0.5, 1.0, 2.0])
        rows = figures.traversals(model, x[:1], [2, 0], scale=scale, steps=5, span=3.0)
        codes = z0.repeat(10, 1)
        codes[:5, 2] += torch.linspace(-3, 3, 5) * 2.0  # +-span x scale[d] around the code, dim 2 first
        codes[5:, 0] += torch.linspace(-3, 3, 5) * 0.5
        torch.testing.assert_close(rows, model.decode(codes).mean)


def test_the_reconstructions_figure_shows_test_images_above_their_reconstructions(vae_run, npz_data, saved_grids):
    """Nothing checked the bottom row: a figure drawing the originals twice passed every test."""
    from vaelab.data import load_dataset
    from vaelab.reports import make_figures

    model, data = vaelab.load(vae_run), load_dataset(npz_data)
    make_figures(vae_run, model, data)
    images, nrow = saved_grids["reconstructions.png"]
    top, bottom = images[:nrow], images[nrow:]  # image_grid lays nrow images per row
    assert len(bottom) == nrow and all(any(torch.equal(x, t) for t in data.test.x) for x in top)
    with torch.no_grad():
        recon = model.reconstruct(top)
    torch.testing.assert_close(bottom, recon)
    assert not torch.allclose(bottom, top)  # (a reconstruction is not its original here: tiny model, random pixels)


def test_the_report_map_colours_each_code_by_its_own_label(vae_run, npz_data, monkeypatch):
    from vaelab import figures
    from vaelab.data import load_dataset
    from vaelab.reports import make_figures

    drawn = {}
    monkeypatch.setattr(figures, "latent_map", lambda codes, labels, path, classes=None: drawn.update(
        codes=codes, labels=labels) or path)
    model, data = vaelab.load(vae_run), load_dataset(npz_data)
    _, notes = make_figures(vae_run, model, data)
    assert notes["traversals"].startswith(" Rows, top to bottom: dimensions ")
    with torch.no_grad():
        torch.testing.assert_close(drawn["codes"], model.embed(data.test.x))
    assert torch.equal(drawn["labels"], data.test.y)


def test_a_run_of_one_epoch_and_one_latent_dimension_has_visible_curves_and_whole_number_ticks(tmp_path,
                                                                                             monkeypatch):
    """One epoch drew lines of one point, which are invisible, over ticks 0.96 ... 1.04; one latent
    dimension's bars stood over -0.4 ... 0.4."""
    from vaelab import figures

    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig))
    record = {"epoch": 1, "train_loss": 3.0, "val_loss": 2.0, "val_recon": 1.5, "val_kl": 0.5}
    figures.training_curves([record], tmp_path / "curves.png")
    figures.kl_per_dimension([0.2], [0.003], tmp_path / "kl.png")
    curves, kl = saved
    lines = [line for ax in curves.axes for line in ax.get_lines()]
    assert len(lines) == 4 and [line.get_marker() for line in lines] == ["o", "o", "o", "s"]  # KL's own: it hid
    # the reconstruction's point (both axes put it in the middle), and the legend left it out
    assert [t.get_text() for t in curves.axes[1].get_legend().get_texts()] == [
        "validation reconstruction", "validation KL (right axis)"]
    for ax in (*curves.axes[:2], *kl.axes):
        assert [float(t) for t in ax.get_xticks()] == ([1.0] if ax in curves.axes else [0.0])
    saved.clear()
    figures.training_curves([{**record, "epoch": e} for e in range(1, 61)], tmp_path / "curves.png")
    ticks = saved[0].axes[0].get_xticks()
    assert saved[0].axes[0].get_lines()[0].get_marker() in ("None", None, "")  # long runs: plain lines
    assert np.allclose(ticks, np.round(ticks))


def test_kl_per_dimension_of_a_very_wide_latent_is_one_artist_per_panel_not_a_bar_each(tmp_path, monkeypatch):
    """--latent-dim 100000 drew 200,000 bar patches: ~5 minutes of the report (and bars under a pixel wide)."""
    from vaelab import figures

    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig))
    for d in (figures.MAX_BARS, figures.MAX_BARS + 1):
        figures.kl_per_dimension([0.5] * d, [0.003, 0.5] * (d // 2) + [0.5] * (d % 2), tmp_path / "kl.png")
    bars, wide = saved
    assert [len(ax.patches) for ax in bars.axes] == [figures.MAX_BARS] * 2
    assert [len(ax.patches) for ax in wide.axes] == [1, 0] and len(wide.axes[1].collections) == 2
    active, inactive = wide.axes[1].collections  # told apart by marker too, not by colour alone
    assert len(active.get_offsets()) + len(inactive.get_offsets()) == figures.MAX_BARS + 1
    assert not np.array_equal(active.get_paths()[0].vertices, inactive.get_paths()[0].vertices)
    assert {p.get_hatch() for p in bars.axes[1].patches} == {None, "///"}
    assert [t.get_text() for t in bars.axes[1].get_legend().get_texts()] == ["active", "inactive"]


def test_a_vmf_run_reports_one_kl_bar_beside_a_variance_per_dimension(npz_data, tmp_path, monkeypatch):
    """A vMF's KL is one value for the whole latent: its report drew the m variances at x = 0 over each other, and
    then (with the hatched inactive units) failed with an IndexError at the end of every vMF training."""
    from vaelab import figures

    assert main(["train", "--data", npz_data, "--latent", "vmf", *TINY, "--no-baselines",
                 "--out", str(tmp_path / "vmf")]) == 0
    assert (tmp_path / "vmf" / "figures" / "kl_per_dim.png").exists()
    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig))
    figures.kl_per_dimension([0.7], [0.003, 0.2, 0.5], tmp_path / "kl.png")
    kl, variance = saved[0].axes
    assert len(kl.patches) == 1 and kl.get_xlabel().startswith("the latent as a whole")
    assert sorted(p.get_x() + p.get_width() / 2 for p in variance.patches) == [0, 1, 2]
    assert [float(t) for t in variance.get_xticks()] == [0, 1, 2]
    saved.clear()
    figures.kl_per_dimension([0.2, 0.3], [0.2, 0.5], tmp_path / "kl.png")  # all active: no "inactive" entry
    assert [t.get_text() for t in saved[0].axes[1].get_legend().get_texts()] == ["active"]


def test_the_latent_map_tells_apart_classes_beyond_its_twenty_colours(tmp_path, monkeypatch):
    from vaelab import figures

    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig))
    figures.latent_map(torch.randn(50, 2), torch.arange(50) % 25, tmp_path / "map.png")
    dots = saved[0].axes[0].collections
    assert len(dots) == 25
    # class 20 had class 0's colour and marker: the same dots, the same legend entry
    assert dots[0].get_facecolor().tolist() == dots[20].get_facecolor().tolist()
    assert not np.array_equal(dots[0].get_paths()[0].vertices, dots[20].get_paths()[0].vertices)


def test_the_report_page_is_readable_on_a_phone_and_by_a_screen_reader(vae_run):
    """It had no viewport (a phone laid it out 980 px wide: text ~6 px), alt texts were the figures' keys
    ("latent_map"), tables had no caption or header scope, metrics showed raw keys ("n_test"), the traversals did
    not say which dimensions they show, and non-ASCII settings read as JSON escapes."""
    from vaelab import reports

    page = (vae_run / "report.html").read_text()
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page and "<main>" in page
    alts = re.findall(r'alt="([^"]*)"', page)
    assert len(alts) >= 6 and all(alt in reports.ALTS.values() for alt in alts)
    assert page.count("<caption>") == page.count("<table>") == 3 and "<th>" not in page
    assert re.search(r"Rows, top to bottom: dimensions \d, \d and \d \(from 0\)\.</figcaption>", page)
    assert not re.search(r"<td>(epoch|latent_dim|n_test|active_unit_threshold|probe_train_examples)</td>", page)
    config = {"data": {"name": "folder:/data/\u00fcber"}, "model": {"model": "vae"}, "train": {}}
    page = reports._render(config_dict=config, metrics={}, table=[], made={}, run_dir=Path("."))
    assert "<td>\"folder:/data/\u00fcber\"</td>" in page.replace("&quot;", '"')


def test_a_latent_larger_than_the_image_reports_without_a_pca_row(npz_data, tmp_path):
    """Over-complete codes are a VAE's business; PCA has one component per pixel at most, so its row says so
    instead of the report failing after training (64 pixels here, 70 latent units)."""
    out = tmp_path / "wide"
    assert main(["train", "--data", npz_data, "--hidden", "16", "--latent-dim", "70", "--epochs", "1",
                 "--quiet", "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "<td>pca</td><td>70</td><td></td><td></td><td></td><td>none: PCA has at most 64 components" in page
    assert "<td>ae</td>" in page and "<td>vae</td>" in page and not (out / "baselines" / "pca").exists()


def run_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_input_gives_one_line_errors(tmp_path, capsys, npz_data, vae_run):
    assert "unknown" in run_error(["train", "--data", "no-such-set", "--out", str(tmp_path / "a")], capsys).lower()
    grey = tmp_path / "grey.npz"
    np.savez(grey, x=np.full((10, 4, 4), 2.5, dtype=np.float32))
    err = run_error(["train", "--data", f"npz:{grey}", "--out", str(tmp_path / "b"), "--quiet"], capsys)
    assert "[0, 1]" in err and "bernoulli" in err
    err = run_error(["train", "--data", npz_data, "--latent-dim", "0", "--out", str(tmp_path / "c")], capsys)
    assert "--latent-dim" in err
    err = run_error(["train", "--data", npz_data, "--net", "conv", "--hidden", "4,8,16,32",
                     "--out", str(tmp_path / "d"), "--quiet"], capsys)
    assert "--net mlp" in err
    assert "not a directory" in run_error(["evaluate", str(tmp_path / "missing")], capsys)
    assert "out of range" in run_error(["interpolate", str(vae_run), "--a", "100000"], capsys)
    assert "--resume needs --out" in run_error(["train", "--resume"], capsys)
    err = run_error(["train", "--data", npz_data, *TINY, "--out", str(vae_run)], capsys)
    assert "already holds a run" in err
    for argv, flag in ((["reconstruct", "--n", "0"], "--n"), (["reconstruct", "--n", "-1"], "--n"),
                       (["reconstruct", "--n", "101"], "--n"), (["sample", "--nrow", "0"], "--nrow"),
                       (["sample", "--nrow", "-2"], "--nrow"), (["evaluate", "--chunk", "-3"], "--chunk"),
                       (["evaluate", "--nll", "--k", "0"], "--k")):
        err = run_error([argv[0], str(vae_run), *argv[1:]], capsys)  # were tracebacks, or -3 silently 1
        assert f"{flag} must be" in err and argv[-1] in err
    err = run_error(["evaluate", str(vae_run), "--k", "100", "--chunk", "10"], capsys)  # was evaluated without NLL
    assert "--k and --chunk would be ignored: they set the importance-sampled NLL; add --nll or drop them" in err
    err = run_error(["evaluate", str(vae_run / "baselines" / "pca"), "--nll", "--k", "100"], capsys)
    assert "--k would be ignored: PCA's log p(x) is exact, with no importance sampling; drop it" in err
    err = run_error(["evaluate", str(vae_run / "baselines" / "ae"), "--nll"], capsys)
    assert "--nll needs a model of p(x): a VAE (importance-sampled) or PCA (exact), not --model ae" in err
    err = run_error(["sample", str(vae_run / "baselines" / "ae")], capsys)
    assert "holds a --model ae run, which vaelab does not sample from: it has no prior p(z); train a VAE " \
           "(--model vae) to sample" in err
    # --out: a folder, or a picture's name PIL cannot map to a format, were tracebacks; -n counts from the end
    err = run_error(["sample", str(vae_run), "--out", str(tmp_path)], capsys)
    assert f"--out {tmp_path} is a folder; give a file name such as {tmp_path / 'samples.png'}" in err
    for command, name in (("reconstruct", "r.jpg"), ("interpolate", "i")):
        err = run_error([command, str(vae_run), "--out", str(tmp_path / name)], capsys)
        assert "written as PNG; give a name ending in .png" in err
    assert main(["interpolate", str(vae_run), "--a", "-1", "--out", str(tmp_path / "last.PNG")]) == 0
    for flag, index in (("--b", "-13"), ("--a", "12")):  # one past either end
        err = run_error(["interpolate", str(vae_run), flag, index], capsys)
        assert f"{flag} {index} is out of range: the test split has 12 images (0..11, or -12..-1 counting from " \
               "the end)" in err
    assert main(["interpolate", str(vae_run), "--a", "11", "--b", "-12", "--out", str(tmp_path / "ends.png")]) == 0
    with pytest.raises(SystemExit):  # argparse: malformed flag values exit 2
        main(["train", "--hidden", "a,b"])
    assert "comma-separated" in capsys.readouterr().err


def test_device_may_name_one_gpu_of_several(npz_data, vae_run, tmp_path, capsys):
    """--device took auto, cpu or cuda: a user with two GPUs could not pick the second but through
    CUDA_VISIBLE_DEVICES. cuda:N is taken by every command with --device, a missing GPU refused when the run starts."""
    parser = build_parser()
    for argv in (["train"], ["evaluate", "RUN"], ["report", "RUN"], ["sample", "RUN"], ["reconstruct", "RUN"],
                 ["interpolate", "RUN"], ["serve", "RUN"]):
        for taken in ("cuda:1", "cuda:127"):
            assert parser.parse_args([*argv, "--device", taken]).device == taken
        for wrapped in ("cuda:128", "cuda:256"):  # torch.device would read them as cuda:-128 and cuda:0
            with pytest.raises(SystemExit):
                parser.parse_args([*argv, "--device", wrapped])
            assert f"argument --device: {wrapped!r}: torch numbers GPUs cuda:0 to cuda:127" in capsys.readouterr().err
        for bad in ("cuda:01", "cuda:-1", "cuda:", "gpu", "cuda1"):
            with pytest.raises(SystemExit):
                parser.parse_args([*argv, "--device", bad])
            assert f"argument --device: {bad!r} is not one of auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert TrainConfig(device="cuda:12").device == "cuda:12"
    with pytest.raises(ConfigError, match=r"--device 'cuda:x' is not one of auto, cpu, cuda or cuda:N \(cuda:0"):
        TrainConfig(device="cuda:x")
    if torch.cuda.device_count() < 8:  # the machine lacks it: refused when the run starts, before anything is written
        argv = ["train", "--data", npz_data, *TINY, "--device", "cuda:7", "--out", str(tmp_path / "r")]
        err = run_error(argv, capsys)
        assert re.search(r"--device cuda:7( was asked for but torch sees no CUDA device|: torch sees \d)", err)
        assert not (tmp_path / "r").exists()
        for command in ("evaluate", "sample", "reconstruct", "interpolate", "report"):  # in the flag's words too
            assert "--device cuda:7" in run_error([command, str(vae_run), "--device", "cuda:7"], capsys)


@pytest.mark.parametrize("argv", [["train", "--epochs", "abc"], ["train", "--model", "foo"], ["train", "--hidden", "0"],
                                  ["evaluate"], ["bogus"], []])
def test_malformed_command_lines_are_one_line_too(argv, capsys):
    """argparse printed its 16-line usage block above the error."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    prog = " ".join(["vaelab", *argv[:1]]) if argv[:1] != ["bogus"] else "vaelab"
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"{prog}: error: ") and err.endswith(f"; see `{prog} --help`\n")


@pytest.mark.parametrize("argv, line", [
    (["--model", "ae", "--beta", "2", "--k", "3"], "--beta and --k would be ignored (--model ae has a deterministic "
                                                   "code: no posterior, prior or KL term); drop them"),
    (["--model", "ae", "--latent", "vmf"], "--latent would be ignored (--model ae has"),
    (["--model", "pca", "--net", "conv", "--hidden", "3", "--lr", "0.1"],
     "--net, --hidden and --lr would be ignored (--model pca is fitted in closed form by SVD"),
    (["--model", "pca", "--likelihood", "gaussian"], "--likelihood would be ignored (--model pca"),
    (["--cells", "3", "--word-dropout", "0.1"], "--word-dropout and --cells would be ignored (--word-dropout is for "
                                                "--model text-vae; --cells is for --model hvae); drop them"),
    (["--model", "hvae", "--embedding-dim", "8"], "--embedding-dim would be ignored (--embedding-dim is for --model "
                                                  "text-vae)"),
    (["--sigma", "0.3"], "--sigma would be ignored (--sigma is the scale of --likelihood gaussian or "
                         "gaussian-learned); drop it"),
    (["--kl-cycle-ratio", "0.3"], "--kl-cycle-ratio would be ignored (--kl-cycle-ratio shapes the cycles of "
                                  "--kl-cycles N)"),
    (["--lr-min", "1e-4"], "--lr-min would be ignored (--lr-min is where --lr-schedule cosine ends)"),
    (["--model", "hvae", "--hidden", "4,8", "--kl-balance"], "--kl-balance would be ignored (--kl-balance acts while "
                                                            "the KL weight is below 1, as --warmup-epochs N, "
                                                            "--kl-cycles N or a --beta below 1"),
    (["--activation", "gated", "--linear"], "--linear drops every nonlinearity, --activation gated is one"),
])
def test_flags_the_model_would_ignore_are_refused(tmp_path, capsys, argv, line):
    """Each trained without a word: an autoencoder with --beta 2, PCA with --net conv, a VAE with --cells."""
    err = run_error(["train", "--data", "digits", "--epochs", "1", "--quiet", "--no-report", *argv,
                     "--out", str(tmp_path / "run")], capsys)
    assert line in err
    assert not (tmp_path / "run").exists()


def test_flags_each_model_uses_are_accepted_and_pca_dequantises_without_a_likelihood_flag(tmp_path, capsys):
    """The refusals above must not catch flags that act: the same flags beside what they need, and --model given
    without --net (config_from_args then resets --net and --hidden to the model's defaults, unasked)."""
    for i, argv in enumerate((["--model", "pca", "--epochs", "0", "--latent-dim", "2"],
                              ["--model", "ae", "--likelihood", "gaussian", "--sigma", "0.3", "--hidden", "8"],
                              ["--kl-cycles", "2", "--kl-cycle-ratio", "0.3", "--lr-schedule", "cosine", "--lr-min",
                               "1e-4", "--objective", "iwae", "--k", "2", "--hidden", "8"],
                              ["--model", "hvae", "--hidden", "4,8", "--cells", "2", "--likelihood", "gaussian"],
                              ["--model", "hvae", "--hidden", "4,8", "--kl-balance", "--warmup-epochs", "2"])):
        assert main(["train", "--data", "digits", "--epochs", "1", "--quiet", "--no-report", *argv,
                     "--out", str(tmp_path / str(i))]) == 0, capsys.readouterr().err
    data = tmp_path / "eight_bit.npy"  # PCA's p(x|z) is Gaussian: --dequantize needs no --likelihood flag
    np.save(data, np.random.default_rng(0).integers(0, 256, (60, 4, 4), dtype=np.uint8))
    assert main(["train", "--data", f"npy:{data}", "--model", "pca", "--dequantize", "--latent-dim", "2",
                 "--epochs", "1", "--hidden", "8", "--quiet", "--out", str(tmp_path / "pca")]) != 0  # --hidden: PCA
    capsys.readouterr()
    assert main(["train", "--data", f"npy:{data}", "--model", "pca", "--dequantize", "--latent-dim", "2",
                 "--epochs", "1", "--quiet", "--out", str(tmp_path / "pca")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "pca" / "baselines" / "vae" / "config.json").read_text())["model"]["likelihood"] \
        == "gaussian"  # the report's VAE baseline on the dequantised pixels


def test_pca_trains_and_reports_on_real_valued_data(tmp_path, capsys):
    """PCA's config keeps the default --likelihood bernoulli, which it does not use (and refuses as a flag), yet
    standardised data were refused as "--likelihood bernoulli needs values in [0, 1]", and then its report's
    baselines trained with that Bernoulli likelihood."""
    data = tmp_path / "standardised.npy"
    np.save(data, np.random.default_rng(0).standard_normal((60, 4, 4)).astype(np.float32))
    assert main(["train", "--data", f"npy:{data}", "--model", "pca", "--latent-dim", "2", "--epochs", "1",
                 "--quiet", "--out", str(tmp_path / "pca")]) == 0, capsys.readouterr().err
    for baseline in ("ae", "vae"):
        assert runs.load_config(tmp_path / "pca" / "baselines" / baseline).model.likelihood == "gaussian"
    assert main(["train", "--data", f"npy:{data}", "--model", "ae", "--latent-dim", "2", "--epochs", "1", "--quiet",
                 "--no-report", "--out", str(tmp_path / "ae")]) == 2  # an AE's Bernoulli does need [0, 1]
    assert "--likelihood bernoulli needs values in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["too few", "overflow"])
def test_a_pca_the_data_cannot_give_is_refused_before_a_run_is_written(tmp_path, capsys, case):
    """The refusal came after config.json and an epoch-0 checkpoint were written: evaluate then scored the unfitted
    PCA with exit 0, and the report said to --resume it. Values near 1e30 fitted an infinite variance."""
    data = tmp_path / "x.npy"
    rng = np.random.default_rng(0)
    np.save(data, (rng.random((10, 8, 8)) * (1e30 if case == "overflow" else 1)).astype(np.float32))
    dim = "20" if case == "too few" else "2"
    assert main(["train", "--data", f"npy:{data}", "--model", "pca", "--latent-dim", dim, "--quiet",
                 "--out", str(tmp_path / "pca")]) == 2
    err = capsys.readouterr().err
    assert ("has at most 8 components" if case == "too few" else "overflows torch.float32: scale the data") in err
    assert not (tmp_path / "pca").exists()


def test_a_relative_data_path_is_stored_absolute_so_later_commands_work_from_elsewhere(tmp_path, monkeypatch,
                                                                                       npz_data):
    """config.json kept `npz:mine.npz` as typed: `vaelab report` from any other folder could not find the data."""
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "mine.npz").write_bytes(Path(npz_data.split(":", 1)[1]).read_bytes())
    monkeypatch.chdir(tmp_path / "work")
    assert main(["train", "--data", "npz:mine.npz", *TINY, "--no-report"]) == 0
    run = tmp_path / "work" / "runs" / "npz-mine-vae"  # the default folder names the file, not its whole path
    assert runs.load_config(run).data.name == f"npz:{tmp_path / 'work' / 'mine.npz'}"
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(run), "--no-baselines", "--quiet"]) == 0
    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--quiet", "--no-report"]) == 0
    assert runs.latest_checkpoint(run).epoch == 3


def test_python_dash_m_entry_point_and_help():
    done = subprocess.run([sys.executable, "-m", "vaelab", "train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for flag in ("--data", "--model", "--likelihood", "--latent-dim", "--net", "--hidden", "--epochs",
                 "--batch-size", "--lr", "--beta", "--warmup-epochs", "--binarize", "--seed", "--device",
                 "--out", "--resume"):
        assert flag in done.stdout, flag


def test_demo_trains_on_the_embedded_digits_and_prints_its_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    report = tmp_path / "demo" / "vae" / "report.html"
    assert str(report.resolve()) in out and report.exists()
    config = json.loads((tmp_path / "demo" / "vae" / "config.json").read_text())
    assert config["data"]["name"] == "mnist5k" and config["model"]["model"] == "vae"
    # running it again reuses the finished run instead of training anew
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--quiet"]) == 0
    assert len(runs.read_metrics(tmp_path / "demo" / "vae")) == 1
    # more epochs extend it (a finished demo was reported as it was, at its old length)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "2", "--quiet"]) == 0
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "demo" / "vae")] == [1, 2]
    assert runs.latest_checkpoint(tmp_path / "demo" / "vae").epoch == 2
    # and so does its AE baseline, which the table compares at the same budget (it stayed at 1 epoch)
    assert runs.latest_checkpoint(tmp_path / "demo" / "vae" / "baselines" / "ae").epoch == 2
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--quiet"]) == 0
    assert "holds a demo of 2 epochs; reporting it as it is (delete the folder to train 1)" in capsys.readouterr().err


def test_a_demo_of_no_epochs_reports_the_untrained_model(tmp_path, capsys):
    """--epochs 0 failed with "d0/vae is not a directory; give the --out folder of a `vaelab train` run"."""
    assert main(["demo", "--out", str(tmp_path / "d0"), "--epochs", "0", "--quiet"]) == 0
    assert "This model is untrained (--epochs 0)" in (tmp_path / "d0" / "vae" / "report.html").read_text()


def command_raising(monkeypatch, error: BaseException) -> None:
    """Make every vaelab command raise `error` (as a training or evaluation step deep in torch would)."""
    from vaelab import cli

    def fail(args):
        raise error

    parser = SimpleNamespace(parse_args=lambda argv: argparse.Namespace(func=fail, command=argv[0]))
    monkeypatch.setattr(cli, "build_parser", lambda: parser)


@pytest.mark.parametrize("error,asked", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 36761600000 bytes. Error code 12 (Cannot allocate memory)"), "36.8 GB"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.79 GiB"),
     "2.00 GiB"),
    (MemoryError("Unable to allocate 3.2 GiB for an array with shape (100000, 8192)"), None),
])
def test_running_out_of_memory_is_one_line_naming_the_settings(monkeypatch, capsys, error, asked):
    command_raising(monkeypatch, error)
    err = run_error(["sample", "runs/x"], capsys)
    assert err.startswith("vaelab: error: out of memory") and "--batch-size" in err and "--latent-dim" in err
    assert (f"(an allocation of {asked})" in err) if asked else "allocation" not in err
    err = run_error(["evaluate", "runs/x"], capsys)  # named training flags evaluate does not take
    assert "give evaluate a smaller --chunk" in err and "--batch-size" not in err


def test_other_runtime_errors_still_raise(monkeypatch):
    command_raising(monkeypatch, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="mat1"):
        main(["evaluate", "runs/x"])


@pytest.mark.parametrize("error,line", [
    (PermissionError(13, "Permission denied", "/data/runs/x/samples.png"),
     "vaelab: error: Permission denied: /data/runs/x/samples.png"),
    (OSError(28, "No space left on device", "/data/.x.tmp", None, "/data/x"),
     "vaelab: error: No space left on device: /data/.x.tmp -> /data/x"),
])
def test_a_file_the_system_refuses_is_one_line_naming_it(monkeypatch, capsys, error, line):
    command_raising(monkeypatch, error)
    assert run_error(["evaluate", "runs/x"], capsys) == line


@pytest.mark.parametrize("fail", ["mkstemp", "replace"])
def test_a_refused_atomic_write_names_the_file_asked_for_not_its_temporary_one(monkeypatch, capsys, vae_run,
                                                                                 tmp_path, fail):
    import vaelab.fileio

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / ".c.md.x1y2.tmp"))

    monkeypatch.setattr(vaelab.fileio.tempfile if fail == "mkstemp" else vaelab.fileio.os, fail, refuse)
    err = run_error(["compare", str(vae_run), "--out", str(tmp_path / "c.md")], capsys)
    assert err == f"vaelab: error: No space left on device: {tmp_path / 'c.md'}"
    assert list(tmp_path.iterdir()) == []  # and no temporary file left behind


def test_pictures_are_written_atomically(monkeypatch, capsys, vae_run, tmp_path):
    """A full disk cut a good samples.png short (4,096 bytes of it) and left a 0-byte new one, with a traceback."""
    import vaelab.fileio

    out = tmp_path / "s.png"
    assert main(["sample", str(vae_run), "--n", "4", "--out", str(out)]) == 0
    good = out.read_bytes()

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(vaelab.fileio.os, "fsync", refuse)
    capsys.readouterr()
    assert run_error(["sample", str(vae_run), "--n", "9", "--out", str(out)], capsys) == \
        f"vaelab: error: No space left on device: {out}"
    assert out.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]


def test_a_tilde_in_run_and_output_paths_means_home(vae_run, tmp_path, monkeypatch):
    """`--out=~/x` and a quoted '~/x' reach vaelab unexpanded: train made a folder named "~", evaluate said "~/r is
    not a directory" (serve expanded it)."""
    monkeypatch.setenv("HOME", str(vae_run.parent))
    monkeypatch.chdir(tmp_path)
    assert main(["sample", f"~/{vae_run.name}", "--n", "4", "--out", "~/s.png"]) == 0
    assert (vae_run.parent / "s.png").is_file() and not (tmp_path / "~").exists()


def test_evaluate_prints_its_results_before_a_refused_write(monkeypatch, capsys, vae_run):
    """A read-only run or a full disk lost every metric (a long --nll estimate too) with the one-line error."""
    import vaelab.fileio

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(vaelab.fileio.tempfile, "mkstemp", refuse)
    assert main(["evaluate", str(vae_run), "--no-probe"]) == 2
    captured = capsys.readouterr()
    assert "test_elbo" in captured.out and f"Read-only file system: {vae_run / 'evaluation.json'}" in captured.err


def test_os_errors_without_a_file_still_raise(monkeypatch):
    command_raising(monkeypatch, OSError("a socket closed"))
    with pytest.raises(OSError, match="socket"):
        main(["evaluate", "runs/x"])


def test_run_and_output_paths_of_the_wrong_kind_are_refused_by_name(tmp_path, capsys, vae_run):
    """A file as train's or demo's --out, a folder as compare's: tracebacks from mkdir and os.replace."""
    file = tmp_path / "afile"
    file.write_text("")
    for argv in (["train", "--data", "digits", "--epochs", "1"], ["demo", "--epochs", "1"]):
        err = run_error([*argv, "--quiet", "--out", str(file)], capsys)
        assert f"--out {file} is a file; give a folder for the run" in err
    err = run_error(["compare", str(vae_run), "--out", str(tmp_path)], capsys)
    assert f"--out {tmp_path} is a folder; give a file name such as {tmp_path / 'compare.md'}" in err


def test_a_run_on_the_user_s_files_without_a_hash_of_them_says_they_cannot_be_checked(tmp_path, capsys):
    """Runs trained before data.fingerprint existed were read under today's rules (uint16 scaling, hidden files,
    EXIF rotation, uint8 masks) without a word: numbers of other data, or other splits."""
    np.save(tmp_path / "d.npy", np.random.default_rng(1).integers(0, 256, (100, 8, 8), dtype=np.uint8))
    run = tmp_path / "old"
    assert main(["train", "--data", f"npy:{tmp_path / 'd.npy'}", *TINY, "--no-report", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    del config["data"]["fingerprint"]  # as written before 2026-12-01
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["evaluate", str(run), "--no-probe"]) == 0
    err = capsys.readouterr().err
    assert err.count(f"vaelab: note: {run} records no hash of its data (runs trained before 2026-12-01, or in "
                     "Python on a data set passed in prepared)") == 1, err
    assert "how files are read has changed (README, Data" in err
    main(["train", "--data", "digits", *TINY, "--no-report", "--out", str(tmp_path / "new")])
    runs.load_config(tmp_path / "new")
    assert "records no hash" not in capsys.readouterr().err  # built-in data sets, and runs that have one


def test_a_run_on_the_user_s_files_notices_when_they_change(tmp_path, capsys):
    """The splits are a fixed shuffle of the rows, so rows reordered or added after training move images between
    them: evaluate reported a test set holding training images, with exit status 0."""
    rng = np.random.default_rng(1)
    data = tmp_path / "d.npy"
    x = rng.integers(0, 256, (100, 8, 8), dtype=np.uint8)
    np.save(data, x)
    run = tmp_path / "run"
    assert main(["train", "--data", f"npy:{tmp_path / '.' / 'd.npy'}", *TINY, "--no-report", "--out", str(run)]) == 0
    config = runs.load_config(run)
    assert config.data.name == f"npy:{data}" and config.data.fingerprint.startswith("80/10/10:")  # normalised path
    assert main(["evaluate", str(run), "--no-probe"]) == 0
    capsys.readouterr()
    for changed, said in [(x[rng.permutation(100)], "the same sizes, other contents"),
                          (np.concatenate([x, x[:10]]), "80/10/10 train/val/test examples then, 88/11/11 now")]:
        np.save(data, changed)
        for command in (["evaluate", str(run), "--no-probe"], ["report", str(run), "--no-baselines"],
                        ["train", "--resume", "--out", str(run), "--epochs", "3", "--no-report"]):
            assert main(command) == 2
            err = capsys.readouterr().err
            assert (f"{data} has changed since the run trained on it ({said}): the files, or how this version of "
                    "vaelab reads them (README, Data); put back") in err, err
    with pytest.raises(DataError, match="has changed since"):  # a config built in Python, without the fingerprint
        vaelab.train(dataclasses.replace(config, data=dataclasses.replace(config.data, fingerprint=None)), run,
                     resume=True, progress=False)
    data.unlink()
    assert main(["evaluate", str(run)]) == 2
    assert "does not exist" in capsys.readouterr().err  # ... and how to tell the run where its data went:
    np.save(tmp_path / "moved.npy", x)
    assert main(["evaluate", str(run)]) == 2
    assert "point data.name in the run's config.json at where it is now" in capsys.readouterr().err
    stored = json.loads((run / "config.json").read_text())
    stored["data"]["name"] = f"npy:{tmp_path / 'moved.npy'}"
    (run / "config.json").write_text(json.dumps(stored))
    assert main(["evaluate", str(run), "--no-probe"]) == 0


def test_text_runs_keep_perplexity_and_refuse_a_picture_name(tmp_path, capsys, monkeypatch):
    """Re-evaluating without --nll kept nll* but dropped perplexity (the compare table's PPL went blank), and a
    text model's sentences were written into a .png file."""
    from vaelab import evaluate

    run = tmp_path / "run"
    run.mkdir()
    (run / "evaluation.json").write_text(json.dumps({"epoch": 2, "nll": 40.0, "perplexity": 300.0,
                                                     "format": evaluate.EVALUATION_FORMAT}))
    monkeypatch.setattr(evaluate, "test_metrics", lambda *a, **k: {"elbo": 1.0})
    monkeypatch.setattr(evaluate.runs, "latest_checkpoint", lambda r: SimpleNamespace(epoch=2))
    config = SimpleNamespace(train=SimpleNamespace(objective="elbo"))
    monkeypatch.setattr(evaluate.runs, "load_config", lambda r: config)
    monkeypatch.setattr(evaluate.runs, "load", lambda r, **k: None)
    monkeypatch.setattr(evaluate, "prepare_data", lambda c, d=None: None)
    result = evaluate.evaluate_run(run, probe=False)
    assert result["perplexity"] == 300.0 and result["nll"] == 40.0
    from vaelab.cli import _output
    from vaelab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"a text model's output is sentences, written as text; .*x\.txt"):
        _output(tmp_path / "x.png", run / "samples.txt")
    assert _output(tmp_path / "x.txt", run / "samples.txt") == tmp_path / "x.txt"

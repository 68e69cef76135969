"""A run directory's other files damaged or edited by hand, and commands given what they cannot do: one clear line
or a working command, never a traceback, and nothing the run held is lost (each of these was a traceback, a wrong
answer or lost history before)."""
import dataclasses
import json
import shutil
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vaelab import evaluate, runs
from vaelab.cli import main


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    np.savez(root / "bars.npz", x=np.random.default_rng(0).random((120, 6, 6)).astype("float32"))
    out = root / "run"
    assert main(["train", "--data", f"npz:{root / 'bars.npz'}", "--hidden", "16", "--latent-dim", "2", "--epochs",
                 "2", "--batch-size", "16", "--no-report", "--quiet", "--out", str(out)]) == 0
    return out


def copy_of(good_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    return run


def one_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_metrics_lines_that_are_not_records_are_skipped_and_the_later_ones_kept(good_run, tmp_path, capsys):
    run = copy_of(good_run, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    damaged = [lines[0][:-5], "null", "[]", '{"epoch": "x"}', '{"epoch": 3, "train_loss": "abc"}', lines[1]]
    (run / "metrics.jsonl").write_text("\n".join(damaged) + "\n")  # a line cut in the middle of the file, too
    assert [r["epoch"] for r in runs.read_metrics(run)] == [2]
    assert main(["report", str(run), "--no-baselines", "--quiet"]) == 0
    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--no-report", "--quiet"]) == 0
    assert [r["epoch"] for r in runs.read_metrics(run)] == [2, 3]  # epoch 2 survived the rewrite (it was lost)


@pytest.mark.parametrize("content", ["null", "[]", "1", '"s"'])
def test_an_evaluation_json_that_is_not_an_object_is_written_again(good_run, tmp_path, capsys, content):
    run = copy_of(good_run, tmp_path)
    (run / "evaluation.json").write_text(content)
    assert main(["evaluate", str(run), "--no-probe"]) == 0
    assert json.loads((run / "evaluation.json").read_text())["epoch"] == 2
    (run / "evaluation.json").write_text(content)
    assert main(["compare", str(run), "--out", str(tmp_path / "c.md")]) == 0


def test_non_finite_weights_are_refused_by_name_with_a_fallback_that_loads(good_run, tmp_path, capsys):
    run = copy_of(good_run, tmp_path)
    latest = runs.latest_checkpoint(run).path
    weights = load_file(latest / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name].clone().fill_(float("inf"))  # what a flipped exponent bit can make
    save_file(weights, latest / "model.safetensors")
    for command in (["evaluate", str(run), "--no-probe"], ["sample", str(run)], ["train", "--resume", "--out",
                                                                                  str(run), "--epochs", "3"]):
        assert main(command) == 2
        err = one_line(capsys)  # evaluate was "normal expects all elements of std >= 0.0"; sample wrote junk
        assert f"holds NaN or infinite values in {name}; it is damaged; the run also holds epoch-0001" in err
    older = runs.latest_checkpoint(run).path.parent / "epoch-0001" / "model.safetensors"
    save_file({k: v.fill_(float("nan")) for k, v in load_file(older).items()}, older)
    assert main(["evaluate", str(run)]) == 2
    assert "epoch-0001" not in one_line(capsys)  # no fallback as damaged as the checkpoint


def test_a_checkpoint_that_does_not_fit_config_json_says_which_weight(good_run, tmp_path, capsys):
    run = copy_of(good_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["model"]["latent_dim"] = 3
    (run / "config.json").write_text(json.dumps(config))
    assert main(["evaluate", str(run)]) == 2
    err = one_line(capsys)  # it ended at "Error(s) in loading state_dict for VAE:"
    assert "size mismatch for posterior" in err and "was config.json edited" in err


def test_a_one_line_load_error_is_shown_whole(good_run, monkeypatch, capsys):
    """torch's load errors run to two lines and more (the second is shown); one of a single line is shown as it is."""
    def refuse(*args, **kwargs):
        raise RuntimeError("weights on the meta device")

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", refuse)
    assert main(["evaluate", str(good_run)]) == 2
    assert "does not match the model config.json describes (weights on the meta device)" in one_line(capsys)


def test_resume_refuses_another_model_or_a_preset_instead_of_passing_them_over(good_run, tmp_path, capsys):
    run = copy_of(good_run, tmp_path)
    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--model", "pca", "--no-report"]) == 2
    assert "model.model 'vae' in the run, 'pca' here" in one_line(capsys)  # "holds a fitted PCA", exit 0
    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--preset", "hvae-s", "--no-report"]) == 2
    assert "--preset hvae-s sets up a new run" in one_line(capsys)  # was dropped, and the VAE trained on
    assert runs.latest_checkpoint(run).epoch == 2


def test_sample_refuses_a_seed_torch_cannot_take(good_run, tmp_path, capsys):
    for seed in (str(-2**63 - 1), str(2**64)):
        assert main(["sample", str(good_run), "--seed", seed, "--out", str(tmp_path / "s.png")]) == 2
        assert "--seed must be between -2**63 and 2**64 - 1" in one_line(capsys)  # a traceback from manual_seed
    for seed in (str(-2**63), "-1", str(2**64 - 1)):  # the ends of the range are taken
        assert main(["sample", str(good_run), "--seed", seed, "--out", str(tmp_path / "s.png")]) == 0


def test_files_written_atomically_have_the_usual_permissions(good_run, tmp_path):
    run = copy_of(good_run, tmp_path)
    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--no-report", "--quiet"]) == 0
    assert main(["evaluate", str(run), "--no-probe"]) == 0
    from vaelab.fileio import usual_mode

    latest = runs.latest_checkpoint(run).path
    for path in (run / "config.json", run / "evaluation.json", run / "metrics.jsonl", latest / "model.safetensors",
                 run / runs.CHECKPOINTS / "latest.json"):
        assert stat.S_IMODE(path.stat().st_mode) == usual_mode(), path  # were 0600: unreadable to a group
    assert stat.S_IMODE(latest.stat().st_mode) == usual_mode(directory=True)


def test_a_damaged_cached_baseline_is_named_or_left_out(good_run, tmp_path, capsys):
    run = copy_of(good_run, tmp_path)
    (run / "baselines" / "ae").mkdir(parents=True)
    (run / "baselines" / "ae" / "config.json").write_text("garbage")
    assert main(["report", str(run), "--no-baselines", "--quiet"]) == 0  # the run's own report stands
    assert main(["report", str(run), "--quiet"]) == 2
    err = one_line(capsys)  # even --no-baselines said "config.json is not valid JSON ...; restore it"
    assert "the ae baseline cached in" in err and "could not be used" in err and "delete that folder" in err


def test_an_interrupted_evaluation_does_not_speak_of_checkpoints(good_run, monkeypatch, capsys):
    from vaelab import evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate_run", interrupted)
    assert main(["evaluate", str(good_run)]) == 130
    assert capsys.readouterr().err.strip() == "vaelab: interrupted"  # not "the last checkpoint is intact"


def test_a_pointer_whose_epoch_disagrees_with_its_checkpoint_is_refused(good_run, tmp_path, capsys):
    run = copy_of(good_run, tmp_path)
    (run / runs.CHECKPOINTS / runs.LATEST).write_text('{"epoch": 5, "dir": "epoch-0002"}')
    assert main(["train", "--resume", "--out", str(run), "--epochs", "7", "--no-report", "--quiet"]) == 2
    # it trained epochs 6-7 from epoch 2's weights, and metrics.jsonl skipped 3-5
    assert 'says epoch 5, but epoch-0002 holds epoch 2; write {"epoch": 2, "dir": "epoch-0002"}' in one_line(capsys)


@pytest.mark.parametrize("hidden", ["32,,16", "32,", ",32"])
def test_hidden_sizes_with_an_empty_part_are_refused(hidden, capsys):
    with pytest.raises(SystemExit) as exit_status:  # (argparse's errors end the process)
        main(["train", "--hidden", hidden, "--epochs", "0"])
    assert exit_status.value.code == 2
    assert f"expects comma-separated positive integers like 512,256, got {hidden!r}" in one_line(capsys)


def test_out_of_memory_advice_names_k_and_what_resume_can_change(good_run, tmp_path, monkeypatch):
    from vaelab.config import RunConfig, TrainConfig
    from vaelab.errors import TrainingError
    from vaelab.train import Trainer

    config = RunConfig.from_dict(json.loads((good_run / "config.json").read_text()))
    config = RunConfig(data=config.data, model=config.model, train=TrainConfig(epochs=1, objective="iwae", k=50))
    trainer = Trainer(config, tmp_path / "run", progress=False)

    def allocate(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 85899345920 bytes.")
    trainer.loss_terms = allocate
    with pytest.raises(TrainingError, match=r"\(--batch-size 128, --hidden 16, --k 50\).*free memory and --resume, "
                                            r"or start a new run with a lower --batch-size, --hidden or --k"):
        trainer.fit()  # --k, the cause, was not named; and --resume cannot lower --batch-size


def test_a_resume_cut_off_before_its_first_new_epoch_reads_as_unfinished(good_run, tmp_path):
    """A resume with more --epochs writes them into config.json first; cut off then, the run's last checkpoint is
    complete for the old length only, and the report said nothing of the epochs still to train."""
    run = copy_of(good_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["train"]["epochs"] = 4  # what `train --resume --epochs 4`, interrupted in epoch 3, leaves
    (run / "config.json").write_text(json.dumps(config))
    assert not runs.is_complete(run)
    assert main(["report", str(run), "--no-baselines", "--quiet"]) == 0
    assert "Training stopped after epoch 2 of 4" in (run / "report.html").read_text()


def test_a_folder_with_another_tool_s_config_json_is_not_called_a_run(tmp_path, capsys):
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "config.json").write_text('{"learning_rate": 0.1}')
    assert main(["train", "--data", "digits", "--epochs", "0", "--no-report", "--out", str(tmp_path / "proj")]) == 2
    err = one_line(capsys)  # it said "already holds a run; pass --resume", which then failed
    assert "holds a config.json that is not a vaelab run's; choose another --out" in err
    assert (tmp_path / "proj" / "config.json").read_text() == '{"learning_rate": 0.1}'
    assert sorted(p.name for p in (tmp_path / "proj").iterdir()) == ["config.json"]  # no .lock left in it
    from vaelab.config import DataConfig, RunConfig
    from vaelab.errors import CheckpointError
    from vaelab.train import train
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError):  # a resume of a folder holding no run, from Python
        train(RunConfig(data=DataConfig(name="digits")), tmp_path / "empty", resume=True, progress=False)
    assert list((tmp_path / "empty").iterdir()) == []


def test_review_regressions_of_the_day(good_run, tmp_path, capsys):
    """What a review of this session's changes found: resume of a Python config with ignored settings, PCA's
    metrics, text-VAE vMF codes, NumPy counts, and a cached baseline of a run whose data moved."""
    import warnings

    import numpy as np
    import torch

    import vaelab
    from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from vaelab.density import importance_sample
    from vaelab.models.text_vae import TextVAE

    config = RunConfig(data=DataConfig(name="digits"), model=ModelConfig(model="ae", hidden=(16,), latent_dim=2),
                       train=TrainConfig(epochs=1, beta=4.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vaelab.train(config, tmp_path / "ae", progress=False)
    longer = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=2))
    vaelab.train(longer, tmp_path / "ae", resume=True, progress=False)  # "train.beta 1.0 in the run, 4.0 here"
    assert runs.latest_checkpoint(tmp_path / "ae").epoch == 2
    assert main(["train", "--model", "pca", "--data", "digits", "--latent-dim", "2", "--no-report", "--quiet",
                 "--out", str(tmp_path / "pca")]) == 0
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "pca")] == [1]  # PCA's record has no train_loss
    text = TextVAE(input_shape=(10,), latent_dim=4, net="gru", hidden=(16,), vocab_size=20, latent="vmf").eval()
    torch.testing.assert_close(text.embed(torch.randint(4, 20, (3, 10))).norm(dim=-1), torch.ones(3))
    model = runs.load(good_run)
    x = torch.rand(2, 1, 6, 6)
    assert importance_sample(model, x, k=np.int64(4), seed=np.int32(1)).log_px.shape == (2,)  # were refused
    # the run's data moves, config.json is pointed at it, the run trains on: its cached baselines follow it
    run = copy_of(good_run, tmp_path)
    assert main(["report", str(run), "--quiet"]) == 0  # trains the ae/pca baselines
    data = runs.load_config(run).data.name.partition(":")[2]
    moved = tmp_path / "moved.npz"
    shutil.move(data, moved)
    stored = json.loads((run / "config.json").read_text())
    stored["data"]["name"] = f"npz:{moved}"
    (run / "config.json").write_text(json.dumps(stored))
    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--no-report", "--quiet"]) == 0
    assert main(["report", str(run), "--quiet"]) == 0  # "the ae baseline cached in ... could not be used"
    assert runs.load_config(run / "baselines" / "ae").data.name == f"npz:{moved}"
    shutil.move(moved, data)


def test_batch_norm_models_still_train_at_batch_size_1(tmp_path, one_thread):
    """Skipping one-example tail batches must not skip every batch of --batch-size 1 (the HVAE's 2-D batch norm
    takes one image): an UnboundLocalError after the epoch. (24 images of 8x8, a few dozen one-image steps: the
    digits' ~1,250 took 20 s.)"""
    data = tmp_path / "tiny.npz"
    np.savez(data, x=np.random.default_rng(0).integers(0, 256, (24, 8, 8), dtype=np.uint8))
    assert main(["train", "--model", "hvae", "--data", f"npz:{data}", "--hidden", "8", "--latent-dim", "2",
                 "--epochs", "1", "--batch-size", "1", "--no-report", "--quiet", "--out", str(tmp_path / "run")]) == 0
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "run")] == [1]


def test_float_tiffs_are_refused_not_clipped(tmp_path, capsys):
    from PIL import Image

    from vaelab.data import load_dataset
    from vaelab.errors import DataError

    for i in range(3):
        Image.fromarray(np.full((4, 4), 0.25 * i, dtype=np.float32)).save(tmp_path / f"{i}.tif")
    with pytest.raises(DataError, match=r"0\.tif holds float pixels, which have no fixed scale"):
        load_dataset(f"folder:{tmp_path}")  # [0, 1] floats read as 0 and 1/255


def test_a_config_json_without_a_section_is_refused_not_read_as_the_defaults(good_run, tmp_path, capsys):
    """A config.json with its model section deleted loaded as a default 512,256 VAE."""
    run = copy_of(good_run, tmp_path)
    raw = json.loads((run / "config.json").read_text())
    del raw["model"]
    (run / "config.json").write_text(json.dumps(raw))
    assert main(["evaluate", str(run)]) == 2
    assert f"{run / 'config.json'} has no section(s) ['model']; restore it" in one_line(capsys)


def test_a_run_stopped_before_its_first_checkpoint_is_started_again(good_run, tmp_path, capsys):
    """A Ctrl+C while the epoch-0 checkpoint was written left config.json alone: --resume said there was no
    checkpoint, and the same command again that the folder already held a run, until it was deleted by hand."""
    run = copy_of(good_run, tmp_path)
    shutil.rmtree(run / "checkpoints")
    data = runs.load_config(run).data.name
    args = ["train", "--data", data, "--hidden", "16", "--latent-dim", "2", "--epochs", "1", "--batch-size", "16",
            "--no-report", "--quiet", "--out", str(run)]
    assert main(args) == 2  # its checkpoints deleted after training: its metrics say it was trained, keep it
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    (run / "metrics.jsonl").unlink()  # now as a run stopped while its epoch-0 checkpoint was written
    assert main(args) == 0
    assert "holds a run stopped before its first checkpoint: starting it again" in capsys.readouterr().err
    assert runs.latest_checkpoint(run).epoch == 1 and [r["epoch"] for r in runs.read_metrics(run)] == [1]
    assert main(args) == 2 and "already holds a run; pass --resume" in capsys.readouterr().err
    baseline = run / "baselines" / "ae"  # a report's baseline stopped the same way: the report said delete it
    baseline.mkdir(parents=True)
    evaluate.baseline_config(runs.load_config(run), "ae").save(baseline / "config.json")
    assert main(["report", str(run), "--quiet"]) == 0, capsys.readouterr().err
    assert runs.latest_checkpoint(baseline).epoch == 1


def test_a_report_of_a_run_still_training_is_of_one_checkpoint(good_run, tmp_path, monkeypatch):
    """write_report read latest.json four times: of a run training meanwhile, its page mixed the figures of one
    epoch, the metrics of the next and the status of a third (and evaluate labelled weights with a later epoch)."""
    from vaelab.reports import write_report

    run = copy_of(good_run, tmp_path)
    real, reads = runs.latest_checkpoint, []

    def moving(run_dir):  # the first read finds epoch 1; training has moved on to epoch 2 by the next
        reads.append(run_dir)
        latest = real(run_dir)
        if len(reads) > 1:
            return latest
        earlier = latest.path.parent / "epoch-0001"
        return runs.Checkpoint(path=earlier, epoch=1, state=json.loads((earlier / "trainer.json").read_text()))
    monkeypatch.setattr(runs, "latest_checkpoint", moving)
    real_load = runs.load

    def load_then_prune(run_dir, **kw):  # the trainer prunes the folder once it has been read: no second read
        model = real_load(run_dir, **kw)
        if kw.get("checkpoint") is not None:
            shutil.rmtree(kw["checkpoint"].path)
        return model
    monkeypatch.setattr(runs, "load", load_then_prune)
    page = write_report(run, baselines=False).read_text()
    assert json.loads((run / "evaluation.json").read_text())["epoch"] == 1
    assert "Training stopped after epoch 1 of 2" in page

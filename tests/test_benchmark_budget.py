"""benchmarks/budget.py: training for a CPU-time budget, with best-epoch keeping and learning-rate schedules."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from vaelab import runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hvae_fashion_mnist  # noqa: E402
from budget import best_dir, cosine_lr, train_within  # noqa: E402
from hvae_fashion_mnist import paired_difference, training_record  # noqa: E402
from test_train import tiny_config, tiny_data  # noqa: E402


def test_cosine_lr_falls_from_peak_to_floor_over_the_budget_and_counts_earlier_time():
    lr = cosine_lr(1e-2, 1e-4, total_s=100.0)
    assert lr(0.0) == pytest.approx(1e-2)
    assert lr(50.0) == pytest.approx((1e-2 + 1e-4) / 2)
    assert lr(100.0) == pytest.approx(1e-4) and lr(250.0) == pytest.approx(1e-4)
    assert all(lr(a) > lr(b) for a, b in zip(range(0, 100, 10), range(10, 101, 10)))
    resumed = cosine_lr(1e-2, 1e-4, total_s=100.0, spent_s=30.0)  # 30 s spent before a --resume
    assert resumed(20.0) == pytest.approx(lr(50.0))
    assert lr(25.0) == pytest.approx(1e-4 + 0.5 * (1e-2 - 1e-4) * (1 + math.cos(math.pi / 4)))


def test_train_within_runs_each_epoch_at_the_scheduled_rate_and_keeps_the_best(tmp_path):
    asked = []

    def schedule(used_s):
        asked.append(used_s)
        return 1e-3 / len(asked)

    out = tmp_path / "run"
    spent = train_within(tiny_config(), out, cpu_s=5.0, dataset=tiny_data(), best=best_dir(out), lr_at=schedule)
    records = runs.read_metrics(out)
    assert spent["epochs"] == len(records) == len(asked) >= 2
    assert [r["lr"] for r in records] == pytest.approx([1e-3 / i for i in range(1, len(asked) + 1)])
    # every epoch starts inside the budget (asked: the CPU time used before each); the last may end past it, as
    # epochs are uneven on a busy machine, but training stops only when one more, 10% longer, would not fit
    assert asked == sorted(asked) and asked[-1] < 5.0
    last = spent["cpu_s"] - asked[-1]  # the last epoch, with its checkpoint copy and log line
    assert spent["cpu_s"] + 1.1 * last > 5.0
    best = min(records, key=lambda r: r["val_loss"])
    assert (spent["best_epoch"], spent["best_val_loss"]) == (best["epoch"], best["val_loss"])
    assert runs.latest_checkpoint(best_dir(out)).epoch == best["epoch"]


def test_paired_difference_is_the_hvae_minus_vae_nll_per_image_with_its_standard_error():
    log_px_vae = torch.tensor([-300.0, -200.0, -250.0, -150.0])  # images of very different difficulty
    gain = torch.tensor([1.0, 2.0, 0.0, 1.0])  # the HVAE's log p(x) is higher by this much on each image
    diff = paired_difference(log_px_vae + gain, log_px_vae)
    assert diff["mean"] == pytest.approx(-1.0)  # NLL(HVAE) - NLL(VAE): negative when the HVAE is better
    assert diff["stderr"] == pytest.approx(gain.std().item() / 2)  # the spread of difficulty cancels


def test_training_record_is_read_from_the_run_directory_whatever_the_results_name(tmp_path, monkeypatch):
    monkeypatch.setattr(hvae_fashion_mnist, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    assert training_record(run, "a") == {}  # nothing spent yet
    (tmp_path / "results" / "a_training.json").write_text('{"epochs": 3, "cpu_s": 30.0}')
    assert training_record(run, "a") == {"epochs": 3, "cpu_s": 30.0}  # a run from before the record moved
    assert training_record(run, "b") == {}
    (run / "budget.json").write_text('{"epochs": 5, "cpu_s": 50.0}')
    assert training_record(run, "b") == training_record(run, "a") == {"epochs": 5, "cpu_s": 50.0}


def test_fashion_mnist_nll_with_a_cosine_schedule_end_to_end(tmp_path, monkeypatch, one_thread):
    """The script's --lr-schedule cosine path on 28x28 stand-in data and a few CPU seconds: epochs at falling
    rates from --lr towards --lr-min, no fine-tuning, the estimates and the results file under --name."""
    import fashion_mnist_nll

    from vaelab.data import Dataset, Split

    g = torch.Generator().manual_seed(0)
    x = torch.rand(260, 1, 28, 28, generator=g)
    data = Dataset(name="fashion-mnist", train=Split(x[:200], None), val=Split(x[200:230], None),
                   test=Split(x[230:], None))
    prepare = fashion_mnist_nll.prepare_data
    monkeypatch.setattr(fashion_mnist_nll, "prepare_data", lambda config: prepare(config, data))
    monkeypatch.setattr(fashion_mnist_nll, "RESULTS", tmp_path / "results")
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["fashion_mnist_nll.py", "--cpu-minutes", "0.1", "--eval-cpu-minutes", "0.05",
                                      "--k", "20", "--lr-schedule", "cosine", "--lr", "1e-3", "--lr-min", "1e-5",
                                      "--name", "cosine_test", "--out", str(out)])
    fashion_mnist_nll.main()  # (one_thread: two threads' CPU time, under load, counts spin-waits; 1-2 epochs fit)
    result = json.loads((tmp_path / "results" / "cosine_test.json").read_text())
    rates = [r["lr"] for r in runs.read_metrics(out)]
    assert result["lr_schedule"] == "cosine" and result["finetune_lr"] is None and result["lr_min"] == 1e-5
    assert result["epochs"] == len(rates) >= 3 and result["finetune_from_epoch"] is None
    # each epoch's rate is the cosine at the CPU time used before it (creating the run counts: on a budget
    # of seconds the first epoch starts well below the peak); every epoch starts inside the budget
    assert 1e-3 >= rates[0] and all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] > 1e-5
    assert math.isfinite(result["nll"]) and math.isfinite(result["nll_first500_k1000"]) and result["k"] == 20
    assert runs.load(best_dir(out)) is not None


def test_the_hvae_benchmark_takes_the_vae_s_training_time_from_that_run_s_results_only(tmp_path, monkeypatch,
                                                                                      capsys):
    """The VAE row showed results/fashion_mnist_nll.json's training time whatever run --vae named."""
    monkeypatch.setattr(hvae_fashion_mnist, "RESULTS", tmp_path)
    (tmp_path / "smoke.json").write_text(json.dumps({"run": str((tmp_path / "smoke").resolve()), "train_s": 70.0}))
    (tmp_path / "old.json").write_text(json.dumps({"train_s": 80.0}))  # written before results named their run
    assert hvae_fashion_mnist.vae_training(tmp_path / "smoke", "smoke")["train_s"] == 70.0
    assert hvae_fashion_mnist.vae_training(tmp_path / "other", "old")["train_s"] == 80.0
    assert hvae_fashion_mnist.vae_training(tmp_path / "other", "smoke") == {}
    assert "results/smoke.json is of" in capsys.readouterr().out

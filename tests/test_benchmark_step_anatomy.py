"""benchmarks/step_anatomy.py: its hand-written step, the eager reference it measures vaelab against, is right."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from model_overhead import PlainVAE  # noqa: E402
from step_anatomy import HandWrittenStep, PlainStep, check_hand_written  # noqa: E402


def test_hand_written_gradients_match_autograd_on_grey_and_binary_pixels():
    torch.manual_seed(3)
    grey = torch.rand(32, 784)
    assert check_hand_written(grey) < 1e-5
    assert check_hand_written(grey.bernoulli()) < 1e-5


def test_hand_written_steps_follow_the_autograd_steps():
    """Five optimiser steps each, the same noise: the same parameters."""
    x = torch.rand(64, 784, generator=torch.Generator().manual_seed(0)).round()
    torch.manual_seed(0)
    plain = PlainStep()
    torch.manual_seed(0)
    hand = HandWrittenStep(PlainVAE())  # the same initial weights as plain's
    start = hand.weights[0].detach().clone()
    for s in range(5):
        torch.manual_seed(s)
        plain(x)
        torch.manual_seed(s)
        hand(x)
    for ours, theirs in ((hand.weights[0], plain.model.fc1.weight), (hand.weights[5], plain.model.fc5.weight),
                         (hand.biases[2][:16], plain.model.fc_mu.bias)):
        assert (ours - theirs).abs().max() < 1e-4  # Adam moves each weight by up to 1e-3 a step
    assert (hand.weights[0] - start).abs().max() > 1e-3  # they moved


def test_results_go_where_results_says_and_name_the_machine(tmp_path, monkeypatch, capsys):
    """--results FILE: run on another machine, the script had overwritten the stored results the README cites."""
    import json

    import step_anatomy
    from train_speed import describe, machine

    from vaelab.data import Dataset, Split

    x = torch.rand(2 * 128, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    data = Dataset(name="noise", train=Split(x, None), val=Split(x[:8], None), test=Split(x[:8], None))
    monkeypatch.setattr(step_anatomy, "load", lambda examples: data)  # (Fashion-MNIST: seconds to load)
    monkeypatch.setattr(step_anatomy, "matmul_rate", lambda: 1e11)  # (seconds of square products)
    stored = step_anatomy.RESULTS.read_bytes() if step_anatomy.RESULTS.exists() else None
    results = tmp_path / "here" / "anatomy.json"
    monkeypatch.setattr(sys, "argv", ["step_anatomy.py", "--rounds", "1", "--steps", "2", "--results", str(results)])
    step_anatomy.main()
    out = capsys.readouterr().out.splitlines()
    saved = json.loads(results.read_text())
    assert saved["machine"] == machine() and out[1] == f"machine: {describe(machine())}"
    assert saved["data"] == "noise" and saved["matmul_peak_flops"] == 1e11 and saved["steps_per_round"] == 2
    assert set(saved["ms_per_step"]) == {"vaelab", "plain autograd", "hand-written", "its matmuls alone",
                                         "fused Adam alone"}
    assert out[-1].startswith("vaelab_vs_hand_written=")
    assert (step_anatomy.RESULTS.read_bytes() if step_anatomy.RESULTS.exists() else None) == stored  # untouched

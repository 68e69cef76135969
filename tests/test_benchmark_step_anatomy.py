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

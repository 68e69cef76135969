"""benchmarks/text_step.py: its in-pieces variant really is the nine-graph step, its traced one vaelab's one."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from text_step import run, sentences  # noqa: E402


def test_sentences_end_in_eos_then_padding():
    x = sentences(50, 21, 100)
    ends = (x == 2).int().argmax(1)
    assert ((x == 2).sum(1) == 1).all() and (ends >= 4).all() and (ends <= 20).all()
    positions = torch.arange(21)
    assert (x[positions > ends[:, None]] == 0).all() and (x[positions < ends[:, None]] >= 4).all()


@pytest.mark.parametrize("net", ["lstm", "gru"])
def test_each_variant_runs_and_only_the_traced_one_is_one_graph(tracing_only, net):
    results = run(net=net, hidden=8, latent_dim=2, embedding_dim=4, vocab=30, length=8, batch_size=4,
                  rounds=1, steps=1)
    assert results["in pieces"]["graphs"] == 9 and results["traced"]["graphs"] == 1
    assert all(r["ms"] > 0 for r in results.values())

"""benchmarks/short_batch.py: its "recompile" is a second graph, at the short batch, and its eager step is one."""
import sys
from pathlib import Path

import pytest
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from short_batch import run  # noqa: E402


@pytest.mark.parametrize("model", ["mlp", "text"])
def test_the_short_batch_compiles_a_second_graph_and_each_time_is_measured(tracing_only, model):
    result = run(model=model, hidden=8, latent_dim=2, batch_size=6, short=5, steps=2)
    assert counters["stats"]["unique_graphs"] == 2  # the full batch's and the short batch's
    assert set(result) == {"compile", "recompile", "eager_step"} and all(v > 0 for v in result.values())

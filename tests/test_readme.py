"""The README's Python examples run as written, in order, as a reader would paste them."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_examples_run_in_order(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)  # the examples write runs/digits
    scope: dict = {}
    for block in blocks:  # later blocks use the names of earlier ones, as a reader would run them
        exec(compile(block, str(README), "exec"), scope)
    assert scope["images"].shape == (16, 1, 8, 8)
    summary = scope["estimate"].summary(n_dims=scope["x"][0].numel())
    assert summary["nll_k"] == 1000 and summary["nll_bits_per_dim"] > 0
    assert (tmp_path / "runs" / "digits" / "config.json").exists()

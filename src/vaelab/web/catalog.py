"""The runs a server may show: found once at startup under one folder, and addressed by name only.

Clients pick a run by its NAME from `Catalog.names`; a name is only ever a key of a dict built on the
server, so nothing a client sends is joined onto a path or opened.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from ..errors import VaelabError
from .explorer import Explorer, RequestError

MAX_DEPTH = 3  # runs/<group>/<run>/baselines/<model> is as deep as vaelab itself nests runs
MAX_RUNS = 500
MAX_NAME = MAX_DEPTH * 256  # a relative path of MAX_DEPTH folder names of up to 255 bytes: every name found
SKIP = {"checkpoints", "figures", "__pycache__", "node_modules"}


def is_run(path: Path) -> bool:
    """Whether a folder looks like a trained run: config.json and a checkpoint pointer."""
    return (path / "config.json").is_file() and (path / "checkpoints" / "latest.json").is_file()


def find_runs(root: Path) -> dict[str, Path]:
    """Runs by name: {root's name: root} for a run folder, else each run below root by its relative path."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise VaelabError(f"{root} is not a directory; give a run folder written by `vaelab train`, "
                          "or a folder of runs")
    if is_run(root):
        return {root.resolve().name or "run": root}
    found: dict[str, Path] = {}
    base_depth = len(root.parts)
    seen = set()  # folders by their real path: a link back up (ln -s . loop) or to a run listed it under many names
    for folder, subdirs, _ in os.walk(root, followlinks=True):  # runs linked in count
        here = Path(folder)
        real = here.resolve()
        if real in seen:
            subdirs[:] = []
            continue
        seen.add(real)
        # folders themselves before links to them: a run reached both ways keeps its own name
        subdirs[:] = sorted((d for d in subdirs if not d.startswith(".") and d not in SKIP),
                            key=lambda d: (os.path.islink(os.path.join(folder, d)), d))
        if len(here.parts) - base_depth >= MAX_DEPTH:
            subdirs[:] = []
        if here != root and is_run(here):
            found[here.relative_to(root).as_posix()] = here
            if len(found) >= MAX_RUNS:
                break
    if not found:
        raise VaelabError(f"no trained runs under {root} (looked for config.json with checkpoints/latest.json, "
                          f"{MAX_DEPTH} folders deep); train one with `vaelab train --out DIR`")
    return dict(sorted(found.items()))


class Catalog:
    """Named runs, each loaded into an Explorer on first use and kept."""

    def __init__(self, root: Path, *, device: str = "cpu", preload: bool = True):
        self.runs = find_runs(root)
        self.device = device
        self.default = next(iter(self.runs))
        self._loaded: dict[str, Explorer] = {}
        self._errors: dict[str, str] = {}
        self._locks = {name: threading.Lock() for name in self.runs}
        if preload:  # the default run is ready before the address is printed; others load when first asked for
            try:
                self.get(self.default)
            except RequestError as e:
                if len(self.runs) == 1:
                    raise VaelabError(str(e)) from None  # nothing else to show: fail before serving

    @property
    def names(self) -> list[str]:
        """Run names, sorted."""
        return list(self.runs)

    def listing(self) -> dict[str, Any]:
        """What GET /api/runs answers."""
        return {"runs": [{"name": n, "loaded": n in self._loaded, "error": self._errors.get(n)} for n in self.runs],
                "default": self.default}

    def get(self, name: str | None) -> Explorer:
        """The explorer of run `name` (the default run when None), loading it once."""
        name = self.default if name is None else name
        if len(name) > MAX_NAME or name not in self.runs:
            shown = name if len(name) <= 60 else name[:60] + "..."
            raise RequestError(f"unknown run {shown!r}; GET /api/runs lists the run names this server offers")
        if name in self._loaded:
            return self._loaded[name]
        with self._locks[name]:
            if name not in self._loaded:
                if name in self._errors:
                    raise RequestError(self._errors[name], status=503)
                try:
                    self._loaded[name] = Explorer.load(name, self.runs[name], device=self.device)
                except VaelabError as e:
                    self._errors[name] = f"run {name} cannot be shown: {e}"
                    raise RequestError(self._errors[name], status=503) from None
            return self._loaded[name]

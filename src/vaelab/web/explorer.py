"""One run held in memory for the latent explorer: model, test set, encodings and 2-D map, and what it decodes.

Image models answer with PNG pictures (the `*_png` methods); text models (a text VAE on a token data set)
with sentences, greedy decodes (the `*_text` methods). Everything a request needs is computed once in
`Explorer.load`, so a request costs one small forward pass and a PNG encoding or a short greedy decode.
Methods assume arguments went through `check_index` and `parse_z`, which raise RequestError with a
message the page can show.
"""
from __future__ import annotations

import inspect
import io
import math
import shlex
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import figures, runs, text_views
from ..data.text import tokens_to_text
from ..errors import VaelabError
from ..evaluate import has_nll, read_evaluation, stale
from ..latent_stats import codes as test_codes
from ..latent_stats import kl_per_unit
from ..models.common import has_prior, no_prior
from ..models.hvae import MAX_TEMPERATURE
from ..prepare import prepare_data
from ..system import model_device
from ..vmf import on_sphere

MAX_MAP_POINTS = 2000  # the page's canvas stays responsive; larger test sets show a fixed random subset
MAX_SLIDERS = 16
MAX_FRAMES = 32
MAX_SAMPLES = 64
Z_CHARS_PER_DIM = 32  # "-1.2345678901234567e-05," is 24: room for any float's repr
MAX_ABS_Z = 1e3  # finite but huge codes overflow the decoder; nothing useful lives out there
METRIC_KEYS = ("nll", "nll_stderr", "nll_bits_per_dim", "test_elbo", "test_loss", "test_recon", "test_kl",
               "active_units", "mutual_information", "mutual_information_upper", "probe_accuracy_latent",
               "sse_per_image")


class RequestError(VaelabError):
    """A request the explorer cannot answer as asked; `status` is the HTTP status to reply with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def png(images: torch.Tensor, *, nrow: int, pad: int = 1) -> bytes:
    """Images (N, C, H, W) in [0, 1] tiled into one PNG at native resolution (the page scales it up)."""
    buffer = io.BytesIO()
    # compress_level 1: these pictures are tiny, and encoding speed matters more than bytes
    figures.image_grid(images.nan_to_num(0.5), nrow=nrow, pad=pad).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def supports_temperature(model: nn.Module) -> bool:
    """Whether model.sample takes a `temperature` argument (hierarchical models do)."""
    try:
        return "temperature" in inspect.signature(model.sample).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class Explorer:
    """A loaded run: everything the web endpoints read, computed once."""

    name: str
    model: nn.Module
    test_x: torch.Tensor  # (N, C, H, W) images or (N, T) token ids, on the model's device
    codes: torch.Tensor  # (N, D) point codes on the CPU
    labels: list[int] | None  # (N,) test labels
    summary: dict[str, Any]  # as at loading; current_summary() reads evaluation.json again
    map: dict[str, Any]
    run_dir: Path
    checkpoint_epoch: int  # the epoch of the checkpoint loaded
    vocab: tuple[str, ...] | None = None  # the tokens of a text model's data set; None for images
    _sample_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    @torch.no_grad()
    def load(cls, name: str, run_dir: Path, *, device: str = "cpu") -> Explorer:
        """Load a run's model and test split and precompute its encodings, map and summary."""
        config = runs.load_config(run_dir)
        checkpoint = runs.latest_checkpoint(run_dir)  # its epoch names the model shown (metrics of other epochs
        epoch = checkpoint.epoch  # are not its own), so the weights come from this very checkpoint
        model = runs.load(run_dir, device=device, checkpoint=checkpoint)
        data = prepare_data(config)
        x = data.test.x.to(model_device(model))
        if x.shape[0] == 0:
            raise VaelabError(f"run {name}: the test split of {data.name} is empty; there is nothing to map")
        codes = test_codes(model, x)
        summary = {**_summary(name, run_dir, config, model, data, codes, epoch), **_evaluated(run_dir, epoch)}
        labels = data.test.y.tolist() if data.test.y is not None else None
        return cls(name=name, model=model, test_x=x, codes=codes, labels=labels, summary=summary,
                   map=_map(codes, labels, data.classes), vocab=data.vocab, run_dir=run_dir, checkpoint_epoch=epoch)

    def current_summary(self) -> dict[str, Any]:
        """The summary with the metrics of evaluation.json as it is now: `vaelab evaluate` may have run since the
        run was loaded (the page tells the user to run it and reload)."""
        return {**self.summary, **_evaluated(self.run_dir, self.checkpoint_epoch)}

    @property
    def is_text(self) -> bool:
        """Whether the run models token sequences: requests are answered with sentences, not PNGs."""
        return self.vocab is not None

    @property
    def n_test(self) -> int:
        """Number of test images (or sentences)."""
        return int(self.test_x.shape[0])

    def check_index(self, index: int, what: str = "index") -> int:
        """A test-image index, refused unless 0 <= index < N."""
        if not 0 <= index < self.n_test:
            items = "sentences" if self.is_text else "images"
            raise RequestError(f"{what} {index} is out of range: the test split has {self.n_test} {items} "
                               f"(0..{self.n_test - 1})")
        return index

    def parse_z(self, text: str) -> torch.Tensor:
        """A latent vector from comma-separated numbers: exactly D finite values of moderate size; for a model whose
        codes live on the sphere (vMF), its direction z / |z|, where the decoder was trained (the sliders and the
        map point off the sphere, and were decoded there)."""
        d = self.model.latent_dim
        if len(text) > Z_CHARS_PER_DIM * d:
            raise RequestError(f"z is too long ({len(text)} characters) for {d} numbers; "
                               f"send at most {Z_CHARS_PER_DIM} characters per value")
        parts = text.split(",") if text.strip() else []  # "" is no values, not one empty one
        if len(parts) != d:
            raise RequestError(f"z has {len(parts)} values but this model's latent has {d} dimensions")
        try:
            if any("_" in p for p in parts):  # float() reads "1_0" as 10
                raise ValueError
            values = [float(p) for p in parts]
        except ValueError:
            raise RequestError("z must be comma-separated numbers, e.g. z=0.1,-2") from None
        bad = next((v for v in values if not math.isfinite(v)), None)
        if bad is not None:
            raise RequestError(f"z must hold finite numbers, got {bad}")
        if max(abs(v) for v in values) > MAX_ABS_Z:
            raise RequestError(f"z values must lie within +-{MAX_ABS_Z:g}")
        z = torch.tensor(values, dtype=torch.float32)
        if on_sphere(self.model):
            if not bool(z.any()):
                raise RequestError("z = 0 has no direction: this model decodes codes on the sphere, z / |z|")
            z = F.normalize(z, dim=0)
        return z

    def encoding(self, index: int) -> dict[str, Any]:
        """The point code of test image `index`, with its label."""
        return {"index": index, "z": self.codes[index].tolist(),
                "label": None if self.labels is None else self.labels[index]}

    @torch.no_grad()
    def decode_png(self, z: torch.Tensor) -> bytes:
        """The mean of p(x|z) for one code z (D,), as a PNG."""
        return png(self.model.decode(z[None].to(model_device(self.model))).mean, nrow=1, pad=0)

    @torch.no_grad()
    def reconstruct_png(self, index: int) -> bytes:
        """Test image `index` and its reconstruction, side by side."""
        x = self.test_x[index:index + 1]
        return png(torch.cat([x, self.model.reconstruct(x)]), nrow=2)

    @torch.no_grad()
    def interpolate_png(self, a: int, b: int, n: int) -> bytes:
        """n frames decoded on the line between the codes of test images a and b, as one strip."""
        _check_frames(n)
        frames = figures.interpolations(self.model, self.test_x[a:a + 1], self.test_x[b:b + 1], steps=n)
        return png(frames, nrow=n)

    @torch.no_grad()
    def samples_png(self, n: int, temperature: float, seed: int) -> bytes:
        """n prior samples (a temperature-scaled prior for hierarchical models), drawn with `seed`."""
        return png(self._samples(n, temperature, seed), nrow=math.ceil(math.sqrt(n)))

    # text models: the same requests, answered with sentences (greedy decodes)

    def _sentences(self, tokens: torch.Tensor) -> list[str]:
        return [tokens_to_text(row, self.vocab) for row in tokens]

    def decode_text(self, z: torch.Tensor) -> list[str]:
        """The greedy decode of one code z (D,): [sentence]."""
        return self._sentences(self.model.greedy(z[None].to(model_device(self.model))))

    def reconstruct_text(self, index: int) -> list[str]:
        """[test sentence `index`, the greedy decode of its posterior mean]."""
        return list(text_views.reconstructions(self.model, self.test_x[index:index + 1], self.vocab)[0])

    def interpolate_text(self, a: int, b: int, n: int) -> list[str]:
        """n greedy decodes on the line between the codes of test sentences a and b."""
        _check_frames(n)
        return text_views.interpolation(self.model, self.test_x[a], self.test_x[b], self.vocab, steps=n)

    def samples_text(self, n: int, temperature: float, seed: int) -> list[str]:
        """n sentences decoded from prior samples drawn with `seed`."""
        return self._sentences(self._samples(n, temperature, seed))

    @torch.no_grad()
    def _samples(self, n: int, temperature: float, seed: int) -> torch.Tensor:
        """model.sample(n) (with the temperature where the model takes one), after checking the request."""
        if not has_prior(self.model):
            raise RequestError(f"this run's model ({self.summary['model']}) is not sampled from: {no_prior('it')}",
                               status=400)
        if not 1 <= n <= MAX_SAMPLES:
            raise RequestError(f"n must be between 1 and {MAX_SAMPLES} samples, got {n}")
        if not 0 <= temperature <= MAX_TEMPERATURE:  # (NaN fails it too)
            raise RequestError(f"t must be a temperature in [0, {MAX_TEMPERATURE:g}], got {temperature}")
        kwargs = {}
        if supports_temperature(self.model):
            kwargs["temperature"] = temperature
        elif temperature != 1:
            raise RequestError(f"this run's model ({self.summary['model']}) has no sampling temperature; "
                               "use t=1", status=400)
        device = model_device(self.model)
        # the global generator is shared by every request thread: seed and draw under one lock, on a fork
        with self._sample_lock, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            return self.model.sample(n, **kwargs)


def _check_frames(n: int) -> None:
    if not 2 <= n <= MAX_FRAMES:
        raise RequestError(f"n must be between 2 and {MAX_FRAMES} frames, got {n}")


def _summary(name: str, run_dir: Path, config: Any, model: nn.Module, data: Any,
             codes: torch.Tensor, epoch: int | None) -> dict[str, Any]:
    """What the page shows beside the pictures, and how it lays out the sliders (test metrics: _evaluated)."""
    evaluation = _evaluation_of(run_dir, epoch)
    d = codes.shape[1]
    kl = evaluation.get("kl_per_dim")
    if (not isinstance(kl, list) or len(kl) != d) and has_prior(model) and not hasattr(model, "group_means"):
        try:
            kl = kl_per_unit(model, data.test.x.to(model_device(model)))
        except (NotImplementedError, RuntimeError):  # a latent family without an analytic per-unit KL
            kl = None
    kl = kl if isinstance(kl, list) and len(kl) == d else None
    std = codes.double().std(0) if codes.shape[0] > 1 else torch.ones(d, dtype=torch.float64)
    # the most used dimensions first: by KL for a VAE, by the spread of the codes otherwise
    order = torch.tensor(kl).argsort(descending=True) if kl is not None else std.argsort(descending=True)
    dims = order[:MAX_SLIDERS].tolist()
    # +-3 standard deviations of the test codes; a floor keeps an unused dimension's slider movable,
    # so the page shows that moving it changes nothing rather than looking broken
    span = 3 * std.clamp_min(0.1 * float(std.max()) + 1e-6)
    # the loaded checkpoint's own record: a run still training (or a metrics line written before a checkpoint
    # that failed) has later ones, shown beside an older model
    record = next((r for r in runs.read_metrics(run_dir) if r.get("epoch") == epoch), None)
    return finite_json({
        "run": name, "model": config.model.model, "data": data.name, "latent_dim": d,
        "nll_command": f"vaelab evaluate {shlex.quote(str(run_dir))} --nll",  # run where `vaelab serve` ran
        "kind": "text" if data.is_text else "image",
        "input_shape": list(model.input_shape), "n_test": int(codes.shape[0]),
        "classes": list(data.classes) if data.classes is not None else None,
        "has_prior": has_prior(model), "has_nll": has_nll(model),
        "temperature": supports_temperature(model) if
        has_prior(model) else False,
        "epoch": epoch,
        "last_epoch": {k: v for k, v in record.items() if isinstance(v, (int, float))} if record else {},
        "kl_per_dim": kl,
        "sliders": {"dims": dims, "span": [float(span[i]) for i in dims], "kl": [kl[i] for i in dims] if kl else None},
    })


def _evaluation_of(run_dir: Path, epoch: int | None) -> dict[str, Any]:
    """RUN/evaluation.json if it describes the checkpoint of `epoch` as vaelab defines its numbers now, else {}:
    after more training without a report it describes an earlier one, and its numbers are not the shown model's."""
    evaluation = read_evaluation(run_dir)
    return {} if stale(evaluation, epoch) else evaluation


def _evaluated(run_dir: Path, epoch: int | None) -> dict[str, Any]:
    """The page's test metrics, read from RUN/evaluation.json now."""
    evaluation = _evaluation_of(run_dir, epoch)
    return {"metrics": {k: evaluation[k] for k in METRIC_KEYS if _is_number(evaluation.get(k))},
            "evaluated": bool(evaluation), "nll_density": evaluation.get("nll_density") is True,
            "nll_exact": evaluation.get("nll_exact") is True}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def finite_json(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None, as strict JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _map(codes: torch.Tensor, labels: list[int] | None, classes: tuple[str, ...] | None) -> dict[str, Any]:
    """The 2-D map of the test encodings (a fixed random subset of at most MAX_MAP_POINTS). A 1-D latent is a
    strip, one row per label: the height is no coordinate (the projection maps it to nothing)."""
    points, how = figures.projection(codes)
    if how["dims"] == 1:
        points[:, 1] = torch.from_numpy(figures.strip_rows(labels, codes.shape[0])).float()
    n = codes.shape[0]
    keep = torch.arange(n)
    if n > MAX_MAP_POINTS:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:MAX_MAP_POINTS].sort().values
    return finite_json({
        "points": [[round(float(p[0]), 4), round(float(p[1]), 4)] for p in points[keep]],
        "indices": keep.tolist(),
        "labels": [labels[i] for i in keep.tolist()] if labels is not None else None,
        "classes": list(classes) if classes is not None else None,
        "projection": how,
    })

"""Run configuration: frozen dataclasses per concern, strict JSON in and out (unknown keys raise)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fileio import atomic_write_text

MODELS = ("pca", "ae", "vae")
NETS = ("mlp", "conv")
LIKELIHOODS = ("bernoulli", "gaussian", "gaussian-learned")
BINARIZE = ("none", "dynamic", "static")
DEVICES = ("auto", "cpu", "cuda")
OBJECTIVES = ("elbo", "iwae")
DEFAULT_HIDDEN = {"mlp": (512, 256), "conv": (32, 64)}
CONFIG_VERSION = 1


def _choice(value: str, choices: tuple[str, ...], flag: str) -> None:
    if value not in choices:
        raise ConfigError(f"{flag} {value!r} is not one of {', '.join(choices)}")


def _positive(value: float, flag: str, *, allow_zero: bool = False) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{flag} must be a finite number {bound}, got {value!r}")


def _integer(value: Any, flag: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Which data set, and how pixel values become observations."""

    name: str = "mnist5k"
    binarize: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("--data must name a data set, e.g. mnist5k, digits, fashion-mnist, folder:PATH")
        _choice(self.binarize, BINARIZE, "--binarize")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture; together with the weights it rebuilds the model, nothing else needed."""

    model: str = "vae"
    net: str = "mlp"
    hidden: tuple[int, ...] | None = None  # None: the net's default, DEFAULT_HIDDEN
    latent_dim: int = 16
    likelihood: str = "bernoulli"
    sigma: float = 0.1  # scale of the fixed-variance Gaussian likelihood; initial scale when learned
    linear: bool = False  # AE without any nonlinearity (spans PCA's subspace)
    input_shape: tuple[int, int, int] | None = None  # (C, H, W), filled in from the data

    def __post_init__(self) -> None:
        _choice(self.model, MODELS, "--model")
        _choice(self.net, NETS, "--net")
        _choice(self.likelihood, LIKELIHOODS, "--likelihood")
        _integer(self.latent_dim, "--latent-dim", minimum=1)
        _positive(self.sigma, "--sigma")
        if not isinstance(self.linear, bool):
            raise ConfigError(f"linear must be true or false, got {self.linear!r}")
        hidden = DEFAULT_HIDDEN[self.net] if self.hidden is None else tuple(self.hidden)
        for h in hidden:
            _integer(h, "--hidden (each size)", minimum=1)
        object.__setattr__(self, "hidden", hidden)
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            if len(shape) != 3:
                raise ConfigError(f"input_shape must be (C, H, W), got {self.input_shape!r}")
            for s in shape:
                _integer(s, "input_shape", minimum=1)
            object.__setattr__(self, "input_shape", shape)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and its schedules; the trainer owns these, models never see them."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 1.0
    warmup_epochs: float = 0  # linear KL warm-up from 0 to beta over this many epochs
    objective: str = "elbo"
    k: int = 1  # importance samples per example: IWAE's K, or an ELBO averaged over K samples
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        _integer(self.epochs, "--epochs", minimum=0)
        _integer(self.batch_size, "--batch-size", minimum=1)
        _positive(self.lr, "--lr")
        _positive(self.beta, "--beta", allow_zero=True)
        _positive(self.warmup_epochs, "--warmup-epochs", allow_zero=True)
        _choice(self.objective, OBJECTIVES, "--objective")
        _integer(self.k, "--k", minimum=1)
        _integer(self.seed, "--seed", minimum=0)
        _choice(self.device, DEVICES, "--device")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; stored as config.json in the run directory."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, with the config version."""
        return {"version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config") -> RunConfig:
        """Strict inverse of to_dict: unknown or missing sections and keys raise ConfigError."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        raw = dict(raw)
        version = raw.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(f"{source}: config version {version!r} is not supported (expected {CONFIG_VERSION})")
        unknown = sorted(set(raw) - set(_SECTION_TYPES))
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {unknown}; expected {sorted(_SECTION_TYPES)}")
        parts = {
            name: _section_from_dict(kind, raw.get(name, {}), f"{source}: [{name}]")
            for name, kind in _SECTION_TYPES.items()
        }
        return cls(**parts)

    def save(self, path: Path) -> None:
        """Write as JSON atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        """Read a config.json, with clear errors for unreadable or malformed files."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist; is this a vaelab run directory?") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); restore it or start a new run") from None
        return cls.from_dict(raw, str(path))


_SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def _section_from_dict(kind: type, raw: Any, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a JSON object, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys are {sorted(names)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return kind(**values)
    except TypeError as e:  # e.g. a list where a number belongs
        raise ConfigError(f"{source}: {e}") from None

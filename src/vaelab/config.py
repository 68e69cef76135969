"""Run configuration: frozen dataclasses per concern, strict JSON in and out (unknown keys raise)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fileio import atomic_write_text

MODELS = ("pca", "ae", "vae", "hvae", "text-vae")
HIERARCHICAL_MODELS = ("hvae",)
TEXT_MODELS = ("text-vae",)
LATENT_FAMILIES = ("gaussian", "vmf")
ACTIVATIONS = ("relu", "gated")
IMAGE_NETS, TEXT_NETS = ("mlp", "conv"), ("lstm", "gru")
NETS = IMAGE_NETS + TEXT_NETS
LIKELIHOODS = ("bernoulli", "gaussian", "gaussian-learned")
BINARIZE = ("none", "dynamic", "static")
DEVICES = ("auto", "cpu", "cuda")  # and cuda:N, one GPU of several (device_name)
MAX_GPU_INDEX = 127  # torch keeps a device's index in 8 signed bits
OBJECTIVES = ("elbo", "iwae")
LR_SCHEDULES = ("constant", "cosine")
DEFAULT_HIDDEN = {"mlp": (512, 256), "conv": (32, 64), "lstm": (256,), "gru": (256,)}
CONFIG_VERSION = 1


def _choice(value: str, choices: tuple[str, ...], flag: str) -> None:
    if value not in choices:
        raise ConfigError(f"{flag} {value!r} is not one of {', '.join(choices)}")


def device_name(value: Any, what: str = "--device") -> str:
    """value if it names a device vaelab trains on (auto, cpu, cuda, or cuda:N for one GPU of several), else a
    ConfigError. Only the spelling: whether this machine has the device is asked when a run starts
    (system.resolve_device), so a GPU run's config.json still loads on a laptop.

    what: how the caller's user gave the name (the flag, or the device argument of load), for errors.
    """
    gpu = re.fullmatch(r"cuda:(0|[1-9][0-9]*)", value) if isinstance(value, str) else None
    if gpu and (len(gpu[1]) > 3 or int(gpu[1]) > MAX_GPU_INDEX):  # torch.device would wrap it: cuda:256 is cuda:0
        raise ConfigError(f"{what} {value!r}: torch numbers GPUs cuda:0 to cuda:{MAX_GPU_INDEX}")
    if isinstance(value, str) and (value in DEVICES or gpu):
        return value
    raise ConfigError(f"{what} {value!r} is not one of {', '.join(DEVICES)} or cuda:N (cuda:0, cuda:1, ...)")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range, e.g. 10**400 from a JSON file
        return False


def _numpy_hint(value: Any, kind: str) -> str:
    """A NumPy scalar reads like a number in messages (np.int64(2)); configs are written to JSON, so they take
    Python's own numbers."""
    return f" (a NumPy {type(value).__name__}: pass {kind}(...))" if type(value).__module__ == "numpy" else ""


def _positive(value: float, flag: str, *, allow_zero: bool = False) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
    if not number or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{flag} must be a finite number {bound}, got {value!r}{_numpy_hint(value, 'float')}")


def zeros_last(groups: Sequence[int]) -> bool:
    """Whether a hierarchy's group counts (coarsest scale first) leave only its finest scales without latents."""
    return len(groups) > 0 and groups[0] > 0 and list(groups) == sorted(groups, key=lambda g: g == 0)


def _integer(value: Any, flag: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag} must be an integer >= {minimum}, got {value!r}{_numpy_hint(value, 'int')}")


FILE_DATA = ("folder", "npz", "npy")  # --data PREFIX:PATH, the user's own files (data.registry.CUSTOM)


@dataclass(frozen=True)
class DataConfig:
    """Which data set, and how pixel values become observations."""

    name: str = "mnist5k"
    binarize: str = "none"
    dequantize: bool = False  # 8-bit pixels k/255 as (k + u)/256, u ~ U[0, 1): see data.dequantize
    # data read from the user's files (folder:, npz:, npy:): the splits' sizes and contents' hash at training, which
    # later commands check (data.fingerprint); filled in by the trainer
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("--data must name a data set, e.g. mnist5k, digits, fashion-mnist, folder:PATH")
        prefix, _, path = self.name.partition(":")
        if self.from_files and path:  # stored absolute (and normalised): later commands run from other folders
            object.__setattr__(self, "name", f"{prefix}:{os.path.normpath(Path(path).expanduser().absolute())}")
        _choice(self.binarize, BINARIZE, "--binarize")
        if not isinstance(self.dequantize, bool):
            raise ConfigError(f"--dequantize is on or off (true or false), got {self.dequantize!r}")
        if self.fingerprint is not None and not isinstance(self.fingerprint, str):
            raise ConfigError(f"fingerprint must be a string like '96/12/12:0123456789abcdef', "
                              f"got {self.fingerprint!r}")

    @property
    def from_files(self) -> bool:
        """Whether the data is the user's own files (folder:, npz:, npy:), which can change after training."""
        prefix, colon, _ = self.name.partition(":")
        return bool(colon) and prefix in FILE_DATA


KAPPA_RANGE = (1e-8, 1e5)  # a fixed vMF concentration (--kappa) a new run takes: float32 codes, tested over it
# Numerics in one place: a learned Gaussian scale never drops below this floor, so that pixels that never vary
# (MNIST's borders) cannot drive log p(x|z) to +infinity (likelihoods.py)
SCALE_MIN = 1e-3


@dataclass(frozen=True)
class ModelConfig:
    """Architecture; together with the weights it rebuilds the model, nothing else needed."""

    model: str = "vae"
    net: str | None = None  # None: mlp for images, lstm for text
    hidden: tuple[int, ...] | None = None  # None: the net's default, DEFAULT_HIDDEN
    latent_dim: int = 16
    likelihood: str = "bernoulli"
    sigma: float = 0.1  # scale of the fixed-variance Gaussian likelihood; initial scale when learned
    linear: bool = False  # AE without any nonlinearity (spans PCA's subspace)
    activation: str = "relu"  # MLP hidden units: relu, or gated linear units (VampPrior's GatedDense)
    latent: str = "gaussian"  # the posterior/prior family: diagonal Gaussian, or von Mises-Fisher on a sphere
    kappa: float | None = None  # vMF concentration held fixed (None: learned per example)
    bn_mu: float | None = None  # BN-VAE: batch-normalise the posterior means with this fixed scale gamma
    embedding_dim: int = 128  # text: size of the token embeddings
    word_dropout: float = 0.0  # text: share of decoder inputs replaced by <unk> in training (Bowman et al. 2016)
    input_shape: tuple[int, ...] | None = None  # (C, H, W) of images, or (T,) of text, filled in from the data
    vocab_size: int | None = None  # text: filled in from the data
    groups: tuple[int, ...] | None = None  # hvae: latent groups per scale, top scale first (None: 2 per scale)
    cells: int = 1  # hvae: residual cells per group, in the encoder and in the decoder
    scale_floor: float = 0.01  # hvae: every prior/posterior standard deviation is softplus(.) + this (NVAE)

    @property
    def bernoulli(self) -> bool:
        """Whether p(x|z) is Bernoulli, which needs pixels in [0, 1]; PCA's is Gaussian whatever --likelihood says."""
        return self.likelihood == "bernoulli" and self.model != "pca"

    def __post_init__(self) -> None:
        _choice(self.model, MODELS, "--model")
        if self.net is None:
            default = "lstm" if self.model in TEXT_MODELS else "conv" if self.model in HIERARCHICAL_MODELS else "mlp"
            object.__setattr__(self, "net", default)
        if self.model in HIERARCHICAL_MODELS and self.net != "conv":
            raise ConfigError(f"--model {self.model} is convolutional; drop --net {self.net} or use --net conv")
        _choice(self.net, TEXT_NETS if self.model in TEXT_MODELS else IMAGE_NETS,
                f"--net (for --model {self.model})")
        _integer(self.embedding_dim, "--embedding-dim", minimum=1)
        if not isinstance(self.word_dropout, (int, float)) or not 0 <= self.word_dropout < 1:
            raise ConfigError(f"--word-dropout must be in [0, 1), got {self.word_dropout!r} (at 1 the decoder would "
                              "never read a word in training, yet evaluation and sampling feed it words)")
        if self.vocab_size is not None:
            _integer(self.vocab_size, "vocab_size", minimum=2)
        _choice(self.likelihood, LIKELIHOODS, "--likelihood")
        if self.model in TEXT_MODELS and (self.likelihood != "bernoulli" or self.linear is True):
            flag = "--linear" if self.linear is True else f"--likelihood {self.likelihood}"
            raise ConfigError(f"{flag} is for image models; --model {self.model} scores tokens with a categorical "
                              "distribution over its vocabulary (drop the flag)")
        _integer(self.latent_dim, "--latent-dim", minimum=1)
        _positive(self.sigma, "--sigma")
        if not isinstance(self.linear, bool):
            raise ConfigError(f"linear must be true or false, got {self.linear!r}")
        if self.hidden is not None and not isinstance(self.hidden, (tuple, list)):
            raise ConfigError(f"--hidden must list layer widths, like (512, 256) (512,256 on the command line), got "
                              f"{self.hidden!r}")
        hidden = DEFAULT_HIDDEN[self.net] if self.hidden is None else tuple(self.hidden)
        for h in hidden:
            _integer(h, "--hidden (each size)", minimum=1)
        if not hidden and self.net != "mlp":  # an MLP without hidden layers is a linear map to the latent heads
            raise ConfigError(f"--hidden is empty; --net {self.net} needs at least one "
                              f"{'channel count' if self.net == 'conv' else 'state size'}, like "
                              f"{','.join(map(str, DEFAULT_HIDDEN[self.net]))}")
        object.__setattr__(self, "hidden", hidden)
        self._check_hierarchy(hidden)
        _choice(self.latent, LATENT_FAMILIES, "--latent")
        _choice(self.activation, ACTIVATIONS, "--activation")
        if self.activation != "relu" and self.net != "mlp":
            raise ConfigError(f"--activation {self.activation} is for --net mlp; drop it or use --net mlp")
        if self.activation != "relu" and self.linear:
            raise ConfigError(f"--linear drops every nonlinearity, --activation {self.activation} is one; choose one")
        if self.kappa is not None:
            _positive(self.kappa, "--kappa")
            if self.latent != "vmf":
                raise ConfigError("--kappa sets the concentration of --latent vmf; drop it or add --latent vmf")
        if self.bn_mu is not None:
            _positive(self.bn_mu, "--bn-mu")
            if self.latent != "gaussian":
                raise ConfigError("--bn-mu batch-normalises Gaussian posterior means; use it with --latent gaussian")
        if self.latent == "vmf" and self.latent_dim < 2:
            raise ConfigError("--latent vmf needs --latent-dim >= 2 (z lives on the sphere S^(d-1) in R^d)")
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            if not shape:
                raise ConfigError(f"input_shape must list the data's dimensions, got {self.input_shape!r}")
            for s in shape:
                _integer(s, "input_shape", minimum=1)
            object.__setattr__(self, "input_shape", shape)

    def _check_hierarchy(self, hidden: tuple[int, ...]) -> None:
        _integer(self.cells, "--cells", minimum=1)
        if not isinstance(self.scale_floor, (int, float)) or not 0 < self.scale_floor < 1:
            raise ConfigError(f"--scale-floor must be in (0, 1), got {self.scale_floor!r}")
        if self.model not in HIERARCHICAL_MODELS:
            if self.groups is not None:
                raise ConfigError("--groups sets the latent groups of --model hvae; drop it or use --model hvae")
            return
        if self.groups is not None and not isinstance(self.groups, (tuple, list)):
            raise ConfigError(f"--groups must list one count per scale, like 2,2; got {self.groups!r}")
        groups = (2,) * len(hidden) if self.groups is None else tuple(self.groups)
        for g in groups:
            _integer(g, "--groups (each count)", minimum=0)
        if len(groups) != len(hidden):
            raise ConfigError(f"--groups needs one count per scale, i.e. per entry of --hidden "
                              f"{','.join(map(str, hidden))}; got {','.join(map(str, groups))}")
        if not zeros_last(groups):
            raise ConfigError(f"--groups {','.join(map(str, groups))}: only the finest scales (the last counts) may "
                              "have 0 groups, and the top scale needs at least one, e.g. 4,4,0")
        if self.latent != "gaussian" or self.bn_mu is not None or self.linear:
            raise ConfigError(f"--model {self.model} has Gaussian latent groups; drop --latent/--bn-mu/--linear")
        object.__setattr__(self, "groups", groups)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and its schedules; the trainer owns these, models never see them."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine": from lr down to lr_min over the run's epochs, step by step
    lr_min: float = 0.0
    beta: float = 1.0
    warmup_epochs: float = 0  # linear KL warm-up from 0 to beta over this many epochs
    kl_cycles: int = 0  # cyclical KL annealing: this many cycles over the run (0: off)
    kl_cycle_ratio: float = 0.5  # fraction of each cycle spent rising from 0 to beta
    free_bits: float = 0.0  # free bits: KL per latent unit counts as at least this many nats
    objective: str = "elbo"
    k: int = 1  # importance samples per example: IWAE's K, or an ELBO averaged over K samples
    seed: int = 0
    device: str = "auto"
    grad_clip: float | None = None  # clip the gradients' global norm to this before each step
    kl_balance: bool = False  # hierarchies: NVAE's KL balancing across groups while the KL weight is below 1
    spectral_reg: float = 0.0  # hierarchies: weight lambda of NVAE's spectral regulariser sum_i sigma_max(W_i)
    compile: bool = False  # run each training step's forward pass and loss through torch.compile
    sync_bn: bool = True  # under torchrun, batch-norm statistics over the global batch (else per process)

    def __post_init__(self) -> None:
        _integer(self.epochs, "--epochs", minimum=0)
        _integer(self.batch_size, "--batch-size", minimum=1)
        _positive(self.lr, "--lr")
        _choice(self.lr_schedule, LR_SCHEDULES, "--lr-schedule")
        _positive(self.lr_min, "--lr-min", allow_zero=True)
        if self.lr_min > self.lr:
            raise ConfigError(f"--lr-min {self.lr_min:g} is above --lr {self.lr:g}; the cosine schedule falls "
                              "from --lr to --lr-min")
        _positive(self.beta, "--beta", allow_zero=True)
        _positive(self.warmup_epochs, "--warmup-epochs", allow_zero=True)
        _integer(self.kl_cycles, "--kl-cycles", minimum=0)
        _positive(self.kl_cycle_ratio, "--kl-cycle-ratio")
        if self.kl_cycle_ratio > 1:
            raise ConfigError(f"--kl-cycle-ratio must be in (0, 1], got {self.kl_cycle_ratio}")
        if self.kl_cycles and self.warmup_epochs:
            raise ConfigError("--kl-cycles and --warmup-epochs are two KL schedules; choose one")
        _positive(self.free_bits, "--free-bits", allow_zero=True)
        _choice(self.objective, OBJECTIVES, "--objective")
        _integer(self.k, "--k", minimum=1)
        if self.free_bits and self.objective != "elbo":
            raise ConfigError("--free-bits applies to the ELBO's KL term; use it with --objective elbo")
        _integer(self.seed, "--seed", minimum=0)
        if self.seed >= 2**64:  # torch.manual_seed's largest seed is 2**64 - 1 (vaelab sample's is too)
            raise ConfigError(f"--seed must be below 2**64, got {self.seed}")
        device_name(self.device)
        if self.grad_clip is not None:
            _positive(self.grad_clip, "--grad-clip")
        if not isinstance(self.kl_balance, bool):
            raise ConfigError(f"kl_balance must be true or false, got {self.kl_balance!r}")
        if self.kl_balance and self.objective != "elbo":
            raise ConfigError("--kl-balance reweights the ELBO's KL term; use it with --objective elbo")
        _positive(self.spectral_reg, "--spectral-reg", allow_zero=True)
        for name in ("compile", "sync_bn"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; stored as config.json in the run directory."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for name, kind in _SECTION_TYPES.items():
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"RunConfig's {name} must be a vaelab.config.{kind.__name__}, got "
                                  f"{type(getattr(self, name)).__name__} (e.g. {name}={kind.__name__}(...))")
        if self.model.bn_mu is not None and self.train.batch_size < 2:  # BatchNorm1d's statistics need 2 examples
            raise ConfigError(f"--bn-mu batch-normalises posterior means over each batch, which needs --batch-size "
                              f">= 2, got {self.train.batch_size}")
        if self.data.dequantize:
            if self.model.model in TEXT_MODELS:
                raise ConfigError(f"--dequantize applies to 8-bit images, not to --model {self.model.model}")
            if self.model.bernoulli or self.data.binarize != "none":
                raise ConfigError("--dequantize spreads 8-bit pixels over their bins for a continuous density: use "
                                  "it with --likelihood gaussian or gaussian-learned, without --binarize")
        if self.model.model not in HIERARCHICAL_MODELS:
            if self.train.kl_balance or self.train.spectral_reg:
                raise ConfigError("--kl-balance and --spectral-reg regularise a hierarchy of latent groups; "
                                  "use them with --model hvae")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, with the config version."""
        return {"version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config") -> RunConfig:
        """Inverse of to_dict: unknown sections and keys raise ConfigError; missing ones take their defaults
        (so that a config written before a setting existed still loads; RunConfig.load wants every section)."""
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
        try:
            return cls(**parts)
        except ConfigError as e:  # settings that do not go together
            raise ConfigError(f"{source}: {e}") from None

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
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: [[[...
            raise ConfigError(f"{path} is not valid JSON ({e}); restore it or start a new run") from None
        missing = sorted(set(_SECTION_TYPES) - set(raw)) if isinstance(raw, dict) else []
        if missing:  # every vaelab run writes all three: one deleted would load as the defaults' model
            raise ConfigError(f"{path} has no section(s) {missing}; restore it from a copy of the run")
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
    except (TypeError, ConfigError) as e:  # a list where a number belongs; a value its flag would refuse
        raise ConfigError(f"{source}: {e}") from None


def scale_sizes(size: tuple[int, int], n_scales: int) -> list[tuple[int, int]]:
    """Spatial sizes of scales 0 .. n_scales - 1: each halves the last, rounding up (stride-2, padding-1 convs)."""
    sizes, (h, w) = [], size
    for _ in range(n_scales):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


def check_trainable(config: RunConfig, processes: int = 1) -> None:
    """Settings a new run refuses that a stored run, trained with them, still loads with (its weights hold what they
    set, or its numbers are what they are): a learned scale started below its floor, a fixed vMF kappa beyond what
    float32 codes resolve, batch norm over a 1x1 scale in batches of one."""
    model, train = config.model, config.train
    if model.likelihood == "gaussian-learned" and model.model != "pca" and model.sigma <= SCALE_MIN:
        raise ConfigError(f"--sigma {model.sigma:g} is the learned scale's start, but it never drops below its "
                          f"floor {SCALE_MIN:g} (it started there, silently); give --sigma above {SCALE_MIN:g}")
    if model.kappa is not None and not KAPPA_RANGE[0] <= model.kappa <= KAPPA_RANGE[1]:
        raise ConfigError(f"--kappa {model.kappa:g} is outside [1e-8, 1e5]: above it a float32 code cannot resolve "
                          "the posterior's width (log q(z|x) loses its digits: at 1e10 a test NLL read +1154 nats) "
                          "and the KL loses its own; below it the posterior is the uniform prior")
    statistics_over = train.batch_size * (processes if train.sync_bn else 1)  # examples per batch-norm statistic
    if (model.model in HIERARCHICAL_MODELS and statistics_over < 2 and model.input_shape
            and scale_sizes(model.input_shape[1:], len(model.hidden))[-1] == (1, 1)):  # failed inside torch
        raise ConfigError("--batch-size 1: the hierarchy's coarsest scale is 1x1, where batch norm's statistics "
                          "need 2 examples; use --batch-size >= 2, or fewer --hidden scales")

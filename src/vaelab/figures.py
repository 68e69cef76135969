"""Pictures of a trained model: image grids (PIL) and plots (matplotlib), as PNG files."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from .fileio import atomic_write_bytes  # noqa: E402
from .system import model_device  # noqa: E402
from .vmf import codes_between, on_sphere  # noqa: E402

MAX_BARS = 500  # per-dimension plots draw bars up to this many dimensions (a bar is ~2 pixels wide there)


def image_grid(images: torch.Tensor, *, nrow: int, pad: int = 1, scale: int = 1) -> Image.Image:
    """Tile images (N, C, H, W) with values in [0, 1] into one PIL image, nrow images per row."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    ncol = nrow
    nrows = math.ceil(n / ncol)
    grid = torch.ones(c, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = images[i]
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array[:, :, 0] if c == 1 else array[:, :, :3])
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def _upscale_for(images: torch.Tensor) -> int:
    return max(1, 56 // images.shape[-1])  # small images (8x8 digits) are enlarged to stay visible


def save_grid(images: torch.Tensor, path: Path, *, nrow: int) -> Path:
    """Write image_grid(images) as a PNG, atomically (a full disk left a good picture cut short)."""
    path = Path(path)
    buffer = io.BytesIO()
    image_grid(images, nrow=nrow, scale=_upscale_for(images)).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


@torch.no_grad()
def reconstructions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Originals in the first row, reconstructions in the second: (2N, C, H, W)."""
    x = x.to(model_device(model))
    return torch.cat([x, model.reconstruct(x)])


@torch.no_grad()
def interpolations(model: nn.Module, xa: torch.Tensor, xb: torch.Tensor, *, steps: int) -> torch.Tensor:
    """Decoded points on the line (for vMF latents the great circle) between the codes of xa[i] and xb[i]:
    (P * steps, C, H, W), row by row."""
    device = model_device(model)
    za, zb = model.embed(xa.to(device)), model.embed(xb.to(device))  # (P, D)
    t = torch.linspace(0, 1, steps, device=device)[None, :, None]  # (1, S, 1)
    z = codes_between(model, za[:, None], zb[:, None], t)  # (P, S, D)
    return model.decode(z.flatten(0, 1)).mean


@torch.no_grad()
def traversals(model: nn.Module, x0: torch.Tensor, dims: list[int], *, scale: torch.Tensor,
               steps: int = 9, span: float = 3.0) -> torch.Tensor:
    """Vary one latent dimension at a time around the code of x0 (1, C, H, W), by +-span * scale[d] (for vMF
    latents then put back on the sphere, where the decoder's codes live)."""
    device = model_device(model)
    z0 = model.embed(x0.to(device))[0]  # (D,)
    offsets = torch.linspace(-span, span, steps, device=device)
    rows = []
    for d in dims:
        z = z0.repeat(steps, 1)
        z[:, d] = z0[d] + offsets * scale[d]
        rows.append(F.normalize(z, dim=-1) if on_sphere(model) else z)
    return model.decode(torch.cat(rows)).mean


def projection(codes: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Codes (N, D) as 2-D points p, with the affine map back: z = mean + p[0] * c[0] + p[1] * c[1]. The report's
    latent map and the web page's.

    D <= 2: the identity (padded with zeros for D = 1). D > 2: the plane of the first two principal
    components through the mean code, so a point clicked on the map decodes the code it stands for
    in that plane; the other directions are held at the mean.
    """
    n, d = codes.shape
    codes = codes.double().cpu()
    if d <= 2:
        mean, components, kind = torch.zeros(d, dtype=codes.dtype), torch.eye(2, d, dtype=codes.dtype), "identity"
    else:
        mean = codes.mean(0)
        _, _, vh = torch.linalg.svd(codes - mean, full_matrices=False)
        # one code has one component: the map's second axis is then a zero direction (it changes nothing)
        components, kind = torch.cat([vh[:2], vh.new_zeros(max(0, 2 - vh.shape[0]), d)]), "pca"
    points = (codes - mean) @ components.T  # (N, 2)
    return points.float(), {"kind": kind, "dims": d, "mean": mean.tolist(), "components": components.tolist()}


def strip_rows(labels: np.ndarray | list[int] | None, n: int) -> np.ndarray:
    """Heights for a strip plot of n one-dimensional codes: each label's row, jittered by up to 0.3 (the same
    every time), or the jitter alone without labels. The map of a 1-D latent, in the report and the explorer."""
    rows = np.zeros(n) if labels is None else np.asarray(labels, dtype=float)
    return rows + np.random.default_rng(0).uniform(-0.3, 0.3, n)


def literal(name: str, width: int = 40) -> str:
    """A class name as matplotlib draws it verbatim: "$" escaped (a pair was parsed as TeX, and a name like
    "a$\\frac{1}{$b" stopped the report with a parse error), cut to `width` characters."""
    name = name if len(name) <= width else name[:width - 1] + "\u2026"
    return name.replace("$", r"\$")


MARKERS = "o^sDvP*X"  # classes beyond the palette's colours, in turn


def latent_map(codes: torch.Tensor, labels: torch.Tensor | None, path: Path, *,
               classes: tuple[str, ...] | None = None) -> Path:
    """Scatter of 2-D projected codes coloured by label. A 1-D code is a strip plot: z1 across, one row per
    label, jittered (its projection's second coordinate is all zeros, and every class fell on one line)."""
    points, how = projection(codes)
    strip = how["dims"] == 1
    how = "z" if how["kind"] == "identity" else "PCA of the codes"
    lab = None if labels is None else labels.cpu().numpy()
    if strip:
        points = np.stack([points[:, 0].numpy(), strip_rows(lab, len(points))], 1)
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    if lab is None:
        ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.6)
    else:
        cmap = plt.get_cmap("tab10" if lab.max() < 10 else "tab20")
        names, dots = {}, []
        for k in np.unique(lab):
            names[k] = literal(classes[k] if classes is not None and k < len(classes) else str(k))
            sel = lab == k
            # beyond the palette's colours the marker tells classes apart (class 20 was class 0's twin)
            dots.append(ax.scatter(points[sel, 0], points[sel, 1], s=4 if k < cmap.N else 9, alpha=0.7,
                                   color=cmap(int(k) % cmap.N), marker=MARKERS[int(k) // cmap.N % len(MARKERS)]))
        if strip:
            ax.set_yticks(list(names), list(names.values()))
        else:  # labels given, not taken from the artists: those that start with "_" would be left out
            ax.legend(dots, list(names.values()), markerscale=3, fontsize=8, loc="best", frameon=False)
    ax.set_xlabel(f"{how} 1" if how != "z" else "z1")
    if strip:
        ax.set_ylabel("label" if lab is not None else "")
        if lab is None:
            ax.set_yticks([])
    else:
        ax.set_ylabel(f"{how} 2" if how != "z" else "z2")
    ax.set_title("test encodings" + (" (1-D code, one row per label)" if strip and lab is not None else ""))
    return _save(fig, path)


def training_curves(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Train/validation loss per epoch, and the reconstruction and KL terms beside it."""
    records = [r for r in records if "train_loss" in r]
    if not records:
        return None
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    dots = {"marker": "o", "markersize": 3} if len(epochs) <= 40 else {}  # a run of one epoch drew no line at all
    axes[0].plot(epochs, [r["train_loss"] for r in records], label="train loss", **dots)
    axes[0].plot(epochs, [r["val_loss"] for r in records], label="validation loss", **dots)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("nats per example")
    axes[0].legend(frameon=False)
    lines = axes[1].plot(epochs, [r["val_recon"] for r in records], label="validation reconstruction", **dots)
    if all("val_kl" in r for r in records):  # (autoencoders have none)
        ax_kl = axes[1].twinx()  # its own marker: with one epoch both axes put their point in the middle
        lines += ax_kl.plot(epochs, [r["val_kl"] for r in records], color="C3", label="validation KL (right axis)",
                            **({**dots, "marker": "s", "markerfacecolor": "none", "markersize": 6} if dots else {}))
        ax_kl.set_ylabel("KL", color="C3")
    for ax in axes:
        _integer_ticks(ax, epochs)  # epochs, not 0.96 ... 1.04
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("-log p(x|z)")
    axes[1].legend(lines, [line.get_label() for line in lines], loc="upper right", frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def kl_per_dimension(kl: list[float], variance: list[float] | None, path: Path, *,
                     threshold: float = 0.01, unit: str = "latent dimension") -> Path:
    """Bars of the test KL per latent dimension (or per unit named by `unit`, e.g. latent group),
    with the posterior-mean variance (active units) beside, per dimension (a vMF's KL is one value for the
    whole latent: it has one bar, beside m variances)."""
    d = np.arange(len(kl))
    many = len(kl) > MAX_BARS  # thinner than a pixel, and a patch each (minutes for 100,000): one artist instead
    fig, axes = plt.subplots(1, 2 if variance is not None else 1, figsize=(10, 3.2), dpi=100, squeeze=False)
    if many:
        axes[0, 0].stairs(kl, np.arange(len(kl) + 1) - 0.5, fill=True, color="C0")
    else:
        axes[0, 0].bar(d, kl, color="C0")
    whole = variance is not None and len(kl) == 1 < len(variance)  # a vMF's: no KL per dimension
    axes[0, 0].set_xlabel("the latent as a whole (a vMF KL does not split by dimension)" if whole else unit)
    axes[0, 0].set_ylabel("KL(q(z_d|x) || p(z_d)), nats" if variance is not None and not whole
                          else "KL(q || p), nats")
    _integer_ticks(axes[0, 0], d.tolist())  # dimensions, not -0.4 ... 0.4
    if variance is not None:
        variance = np.asarray(variance)
        dims = np.arange(len(variance))
        many = len(variance) > MAX_BARS
        active = variance > threshold  # told apart by colour and by hatching (or marker), not colour alone
        for shown, colour, hatch, marker, label in ((active, "C2", None, "o", "active"),
                                                    (~active, "C7", "///", "x", "inactive")):
            if not shown.any():  # (an empty group drew a legend entry in a colour found nowhere in the plot)
                continue
            if many:
                axes[0, 1].scatter(dims[shown], variance[shown], s=4, color=colour, marker=marker,
                                   linewidths=0.5, label=label)
            else:
                axes[0, 1].bar(dims[shown], variance[shown], color=colour, hatch=hatch, edgecolor="w", label=label)
        axes[0, 1].legend(frameon=False, fontsize=8)
        axes[0, 1].axhline(threshold, color="k", lw=0.8, ls="--")
        axes[0, 1].set_yscale("log")
        axes[0, 1].set_xlabel("latent dimension")
        axes[0, 1].set_ylabel("Cov_x(E_q[z_d]) (active > 0.01)")
        _integer_ticks(axes[0, 1], dims.tolist())
    fig.tight_layout()
    return _save(fig, path)


def _integer_ticks(ax: plt.Axes, values: list[int]) -> None:
    """x ticks at whole numbers: each value when there are few (matplotlib's integer locator falls back to
    fractions when the axis spans fewer than two whole numbers), else an integer locator."""
    if len(values) <= 12:
        ax.set_xticks(values)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: plt.Figure, path: Path) -> Path:
    """Write a figure as a PNG, atomically, and close it."""
    path = Path(path)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path

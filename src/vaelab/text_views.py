"""What a text VAE says: prior samples, reconstructions and interpolations as sentences, and token accuracy."""
from __future__ import annotations

import html

import torch
from torch import nn

from .data.text import PAD, tokens_to_text
from .system import in_eval_mode, model_device
from .vmf import codes_between


@torch.no_grad()
@in_eval_mode
def samples(model: nn.Module, vocab: tuple[str, ...], n: int) -> list[str]:
    """n sentences greedily decoded from z ~ p(z)."""
    return [tokens_to_text(row, vocab) for row in model.sample(n)]


@torch.no_grad()
@in_eval_mode
def reconstructions(model: nn.Module, x: torch.Tensor, vocab: tuple[str, ...]) -> list[tuple[str, str]]:
    """(sentence, greedy decode of its posterior mean) pairs for token rows x (N, T)."""
    decoded = model.reconstruct(x.to(model_device(model)))
    return [(tokens_to_text(a, vocab), tokens_to_text(b, vocab)) for a, b in zip(x, decoded)]


@torch.no_grad()
@in_eval_mode
def interpolation(model: nn.Module, xa: torch.Tensor, xb: torch.Tensor, vocab: tuple[str, ...],
                  steps: int = 7) -> list[str]:
    """Greedy decodes along the line (for vMF latents the great circle) between the point codes of two sentences
    (T,) each."""
    device = model_device(model)
    za, zb = model.embed(torch.stack([xa, xb]).to(device))
    t = torch.linspace(0, 1, steps, device=device)[:, None]
    return [tokens_to_text(row, vocab) for row in model.greedy(codes_between(model, za, zb, t))]


@torch.no_grad()
@in_eval_mode
def token_accuracy(model: nn.Module, x: torch.Tensor, *, batch_size: int = 500) -> float:
    """Share of real tokens (words and <eos>) that greedy reconstruction from the posterior mean gets right."""
    device = model_device(model)
    right = total = 0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        mask = xb != PAD
        right += int(((model.reconstruct(xb) == xb) & mask).sum())
        total += int(mask.sum())
    return right / max(total, 1)


def _shown(sentence: str) -> str:
    """A sentence as HTML; an empty decode says so (an empty list item read as a blank bullet)."""
    return html.escape(sentence) if sentence else "<em>(empty)</em>"


def html_sections(model: nn.Module, x: torch.Tensor, vocab: tuple[str, ...], *, seed: int = 0) -> str:
    """The report's text sections: samples, reconstructions and two interpolations."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(x.shape[0], generator=g)[:14]
    torch.manual_seed(seed)
    items = "".join(f"<li>{_shown(s)}</li>" for s in samples(model, vocab, 10))
    rows = "".join(f"<tr><td>{_shown(a)}</td><td>{_shown(b)}</td></tr>"
                   for a, b in reconstructions(model, x[pick[:10]], vocab))
    lines = []
    for i in (10, 12):
        path = interpolation(model, x[pick[i]], x[pick[i + 1]], vocab)
        ends = (_shown(tokens_to_text(x[pick[j]], vocab)) for j in (i, i + 1))
        lines.append("<p>From <q>{}</q> to <q>{}</q>:</p><ol>".format(*ends)
                     + "".join(f"<li>{_shown(s)}</li>" for s in path) + "</ol>")
    return (f"<h2>Samples from the prior</h2><p>z ~ p(z), decoded greedily.</p><ul>{items}</ul>"
            f"<h2>Reconstructions</h2><p>Test sentences and the greedy decode of their point code (the posterior "
            f"mean; for vMF latents its mean direction).</p>"
            f'<div class="wide"><table><caption>Test sentences and their reconstructions</caption><thead><tr>'
            f'<th scope="col">sentence</th><th scope="col">reconstruction</th></tr></thead><tbody>{rows}</tbody>'
            "</table></div>"
            "<h2>Interpolations</h2><p>Greedy decodes along the line (for vMF latents the great circle) between the "
            f"point codes of two test sentences (first and last lines decode their codes).</p>{''.join(lines)}")

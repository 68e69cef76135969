"""The sentence VAE: an RNN encoder -> q(z|x), an RNN decoder conditioned on z -> p(x|z) over token sequences.

Shapes: x is (B, T) token ids padded with <pad>; z is (B, D), or (K, B, D) with K samples per example;
decoder logits are (..., T, V) for a vocabulary of V tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, constraints

from ..data.text import BOS, EOS, PAD, UNK, token_counts
from ..errors import ConfigError, InputError
from ..latents import Noise, build_latent
from ..linear import Linear
from .common import Output, check_codes, check_count, check_tokens

RNNS = {"lstm": nn.LSTM, "gru": nn.GRU}
RNNState = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # a GRU's h, or an LSTM's (h, c)


class TokenSequence(Distribution):
    """p(x|z) = prod_t Categorical(x_t; softmax(logits_t)) over the real positions of a teacher-forced sequence.

    The logits (..., T, V) at position t were computed from the tokens before t, so the product is the
    autoregressive likelihood of the sequence the decoder was fed. `mask` (..., T) marks the positions
    that count: the target's words and its <eos>, not the padding after it.
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.nonnegative_integer, 1)

    def __init__(self, logits: torch.Tensor, mask: torch.Tensor, data: torch.Tensor | None = None):
        self.logits = logits
        self.mask = mask
        self.data = data  # the tokens the decoder read (B, T): the only sequence it scores
        super().__init__(batch_shape=logits.shape[:-2], event_shape=logits.shape[-2:-1], validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """sum_t log softmax(logits_t)[x_t] over the masked positions: (...,) = the batch shape. value must be the
        sequence the decoder read (position t's distribution is conditioned on its tokens before t): another
        sequence y was scored against x's history and padding, without a word; decode(z, y) scores y."""
        if self.data is not None and value is not self.data:  # (what follows each <eos> does not count)
            if not (isinstance(value, torch.Tensor) and value.shape == self.data.shape
                    and not value.is_floating_point() and bool(((value == self.data) | (self.data == PAD)).all())):
                raise InputError("log_prob: these are not the tokens decode(z, x) read (teacher forcing conditions "
                                 "each position on x's tokens before it); score y with decode(z, y).log_prob(y)")
            value = self.data
        value = value.expand(self.logits.shape[:-1])  # (B, T) data against (K, B, T, V) logits
        log_p = -F.cross_entropy(self.logits.reshape(-1, self.logits.shape[-1]), value.reshape(-1),
                                 reduction="none").view(value.shape)  # (..., T)
        return log_p.masked_fill(~self.mask, 0.0).sum(-1)

    @property
    def mode(self) -> torch.Tensor:
        """The most likely token at each position given the true history: (..., T) ids."""
        return self.logits.argmax(-1)


class TextVAE(nn.Module):
    """Bowman et al. 2016, "Generating Sentences from a Continuous Space": an RNN VAE over sentences.

    Args:
        input_shape: (T,), the padded sequence length of the data.
        latent_dim: D, the size of z.
        net: "lstm" or "gru", the recurrent cell of encoder and decoder.
        hidden: (H,), the RNN state size.
        vocab_size: V, the number of tokens (ids 0..3 are <pad>, <unk>, <bos>, <eos>).
        embedding_dim: size of the token embeddings, shared by encoder and decoder.
        word_dropout: in training, the probability that a decoder input word is replaced by <unk>.
        latent: "gaussian" or "vmf" posterior and prior, as for the image VAE.
        kappa: fixed vMF concentration (None: learned).
        bn_mu: BN-VAE's fixed scale gamma of batch-normalised posterior means (None: off).
    """

    def __init__(self, *, input_shape: tuple[int], latent_dim: int, net: str = "lstm", hidden: tuple[int, ...] = (256,),
                 vocab_size: int | None = None, embedding_dim: int = 128, word_dropout: float = 0.0,
                 latent: str = "gaussian", kappa: float | None = None, bn_mu: float | None = None):
        super().__init__()
        if vocab_size is None:
            raise ConfigError("text-vae needs vocab_size; it is filled in from a text data set such as fortunes")
        if len(tuple(hidden)) != 1:
            raise ConfigError(f"text-vae takes one --hidden size (the RNN state), got {tuple(hidden)}")
        if len(tuple(input_shape)) != 1:
            raise ConfigError(f"text-vae reads token sequences of shape (T,), got input_shape {tuple(input_shape)}")
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        self.vocab_size = vocab_size
        self.word_dropout = word_dropout
        self.net = net
        h = hidden[0]
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=PAD)
        self.encoder = RNNS[net](embedding_dim, h, batch_first=True)
        self.posterior = build_latent(latent, in_features=h, latent_dim=latent_dim, kappa=kappa, bn_mu=bn_mu)
        # Bowman et al. 2016, Sec. 3 (Fig. 1): z sets the decoder's initial state; here it also joins every
        # input, a common strengthening that makes z harder to ignore.
        self.initial_state = Linear(latent_dim, h * (2 if net == "lstm" else 1))  # LSTM: (h_0, c_0)
        self.decoder = RNNS[net](embedding_dim + latent_dim, h, batch_first=True)
        self.output = Linear(h, vocab_size)

    def encode(self, x: torch.Tensor) -> Distribution:
        """q(z|x) for token ids x (B, T): batch shape (B,), event shape (D,)."""
        return self._encode(x, "encode")

    def _encode(self, x: torch.Tensor, method: str) -> Distribution:
        """encode(x), its input checked under the name of the method called (once)."""
        return self._encode_checked(check_tokens(x, self.vocab_size, method, values=not self.training))

    def _encode_checked(self, x: torch.Tensor) -> Distribution:
        """q(z|x) for checked int64 tokens x (B, T)."""
        states, _ = self.encoder(self.embedding(x))  # (B, T, H)
        # The RNN is causal, so its state at the last real token (the <eos>) has not seen the padding.
        last = (x != PAD).sum(1).clamp(min=1) - 1  # (B,)
        h = states[torch.arange(x.shape[0], device=x.device), last]  # (B, H)
        return self.posterior(h)

    def prior(self) -> Distribution:
        """p(z)."""
        return self.posterior.prior()

    def _state(self, z: torch.Tensor) -> RNNState:
        """Initial decoder state from z (N, D): (1, N, H), or the pair (h_0, c_0) for an LSTM."""
        s = self.initial_state(z).unsqueeze(0)
        return tuple(c.contiguous() for c in s.chunk(2, -1)) if self.net == "lstm" else s  # cuDNN wants contiguous

    def decoder_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens the decoder reads for targets x (N, T): <bos>, x_1 .. x_{T-1}, with word dropout in training."""
        inputs = torch.cat([torch.full_like(x[:, :1], BOS), x[:, :-1]], 1)  # (N, T)
        if self.training and self.word_dropout > 0:
            # Word dropout (Bowman et al. 2016, Sec. 3.1): hiding some of the history from the decoder makes it
            # rely on z. <bos> stays, so the decoder always knows where the sentence starts.
            drop = torch.rand(inputs.shape, device=x.device) < self.word_dropout
            drop[:, 0] = False
            inputs = inputs.masked_fill(drop, UNK)
        return inputs

    def _logits(self, z: torch.Tensor, inputs: torch.Tensor, state: RNNState | None = None
                ) -> tuple[torch.Tensor, RNNState]:
        """Decoder logits (N, T', V) and final state for codes z (N, D) and input tokens (N, T')."""
        e = self.embedding(inputs)  # (N, T', E)
        rnn_in = torch.cat([e, z.unsqueeze(1).expand(-1, e.shape[1], -1)], -1)  # (N, T', E + D)
        out, state = self.decoder(rnn_in, self._state(z) if state is None else state)
        return self.output(out), state

    def decode(self, z: torch.Tensor, x: torch.Tensor) -> TokenSequence:
        """p(x|z) by teacher forcing on the targets x (B, T), for codes z (..., B, D): batch shape z.shape[:-1]."""
        check_codes(z, self.latent_dim, "decode", self)
        data = check_tokens(x, self.vocab_size, "decode", values=not self.training)
        if z.dim() < 2 or z.shape[-2] != data.shape[0]:
            raise InputError(f"decode: z has shape {tuple(z.shape)} for x of {data.shape[0]} sentence(s); pass one "
                             f"code per sentence, (B, {self.latent_dim}) or (K, B, {self.latent_dim})")
        return self._teacher_forced(z, data)

    def _teacher_forced(self, z: torch.Tensor, x: torch.Tensor) -> TokenSequence:
        """decode(z, x) for checked int64 tokens x, without the checks of a caller's codes."""
        lead, t = z.shape[:-1], x.shape[-1]
        targets = x.expand(*lead, t)  # (K, B, T): the data repeated for each sample
        logits, _ = self._logits(z.reshape(-1, self.latent_dim), self.decoder_inputs(targets.reshape(-1, t)))
        # in training the loss scores the batch decoded (and a check would break torch.compile's graph)
        return TokenSequence(logits.view(*lead, t, self.vocab_size), targets != PAD, None if self.training else x)

    def forward(self, x: torch.Tensor, k: int | None = None, noise: Noise | None = None) -> Output:
        """One pass with reparameterised samples: z (B, D), or (K, B, D) when k is given.

        noise: where the standard normal draws come from (default: torch's global generator).
        """
        x = check_tokens(x, self.vocab_size, "forward", values=not self.training)
        qz = self._encode_checked(x)
        z, score = self.posterior.rsample_and_score(qz, k, noise)
        return Output(qz=qz, pz=self.prior(), z=z, px_z=self._teacher_forced(z, x), k=k, score=score)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Point codes (B, D): the posterior modes (means of a Gaussian; for vMF latents the mean direction on the
        sphere, where the decoder's codes live)."""
        return self._encode(x, "embed").mode

    @torch.no_grad()
    def greedy(self, z: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        """Greedy (argmax) decodes of codes z (N, D): (N, max_len) ids, each row <eos>-terminated, then padding.

        A sentence still open at the last position is cut there with <eos>, so every row is valid data.
        """
        check_codes(z, self.latent_dim, "greedy", self)
        if z.dim() != 2:
            raise InputError(f"greedy: z has shape {tuple(z.shape)}; pass a batch of codes (N, {self.latent_dim})")
        # (0 meant the model's length, and -1 failed on a negative dimension); 1 leaves room for the <eos>
        t_max = self.input_shape[0] if max_len is None else check_count(max_len, "greedy", "max_len", of="tokens",
                                                                        least=1)
        n = z.shape[0]
        tokens = torch.full((n, t_max), PAD, dtype=torch.int64, device=z.device)
        inputs = torch.full((n, 1), BOS, dtype=torch.int64, device=z.device)
        done = torch.zeros(n, dtype=torch.bool, device=z.device)
        state = None
        for t in range(t_max):
            logits, state = self._logits(z, inputs, state)  # (N, 1, V)
            logits = logits[:, 0]
            logits[:, [PAD, BOS]] = -torch.inf  # never data tokens
            step = logits.argmax(-1) if t < t_max - 1 else torch.full_like(done, EOS, dtype=torch.int64)
            tokens[:, t] = step.masked_fill(done, PAD)
            done = done | (step == EOS)
            inputs = step.unsqueeze(1)
            if bool(done.all()):  # one sync per step; fine for reports, not a training path
                break
        return tokens

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n sentences from the model: z ~ p(z), then greedy decoding: (n, T) ids."""
        return self.greedy(self.prior().sample((check_count(n, "sample"),)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Greedy decodes of the point codes of x (B, T), embed's (posterior means; for vMF latents the mean
        directions): (B, T) ids."""
        return self.greedy(self._encode(x, "reconstruct").mode)


__all__ = ["TextVAE", "TokenSequence", "token_counts"]

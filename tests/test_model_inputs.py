"""The Python API refuses wrong tensors by name: every model's encode, decode, sample (and the like) raise
InputError saying what the model takes, never an error from deep inside a layer."""
import numpy as np
import pytest
import torch
from test_hvae import small as small_hvae
from test_text import VOCAB, tiny_model
from torch import nn

from vaelab.errors import InputError, VaelabError
from vaelab.models import AE, PCA, VAE, TextVAE
from vaelab.models.common import model_tensor

SHAPE = (1, 6, 6)


def image_models():
    torch.manual_seed(0)
    pca = PCA(input_shape=SHAPE, latent_dim=3).fit(torch.rand(20, *SHAPE))
    return {"vae": VAE(input_shape=SHAPE, latent_dim=3, hidden=(8,)),
            "conv vae": VAE(input_shape=SHAPE, latent_dim=3, net="conv", hidden=(4, 8)),
            "ae": AE(input_shape=SHAPE, latent_dim=3, hidden=(8,)), "pca": pca}


@pytest.mark.parametrize("name", ["vae", "conv vae", "ae", "pca"])
def test_image_models_name_what_encode_and_decode_take(name):
    model = image_models()[name].eval()
    x = torch.rand(4, *SHAPE)
    assert model.reconstruct(x).shape == x.shape  # the right inputs still work
    assert tuple(model.decode(torch.zeros(5, 3)).mean.shape) == (5, *SHAPE)
    for bad, message in [(torch.rand(4, 36), r"shape \(4, 36\).*\(B, 1, 6, 6\) \(flattened images: "
                                             r"x.view\(-1, 1, 6, 6\)\)"),  # the hint was x[None]
                         (torch.rand(*SHAPE), r"shape \(1, 6, 6\).*\(B, 1, 6, 6\) \(one image: x\[None\]\)"),
                         (torch.rand(4, 1, 7, 7), r"\(B, 1, 6, 6\) \(images of another size: resize them"),
                         ((x * 255).to(torch.uint8), r"dtype torch.uint8.*x.float\(\) / 255"),
                         (x.double(), r"dtype torch.float64, but this model's weights are torch.float32: pass "
                                      r"x.to\(torch.float32\)"),  # torch.from_numpy of float data
                         (x.numpy(), r"torch.Tensor.*ndarray")]:
        with pytest.raises(InputError, match=f"encode: .*{message}"):
            model.encode(bad)
        for method in ("reconstruct", "embed"):  # errors name the method called (they said encode)
            with pytest.raises(InputError, match=f"^{method}: .*{message}"):
                getattr(model, method)(bad)
    for bad, message in [(torch.rand(6, 6), r"one grey image: x\[None, None\]"),
                         (torch.rand(4, 6, 6), r"grey images without their channel axis: x\[:, None\]")]:
        with pytest.raises(InputError, match=message):  # the hint was "images of another size: resize them"
            model.encode(bad)
    for bad, message in [(torch.zeros(5, 4), r"shape \(5, 4\).*3 dimensions"), (torch.tensor(0.0), "3 dimensions"),
                         (torch.zeros(5, 3, dtype=torch.int64), "dtype torch.int64"),
                         (torch.zeros(5, 3, dtype=torch.float64), "dtype torch.float64.*z.to\\(torch.float32\\)")]:
        with pytest.raises(InputError, match=f"decode: .*{message}"):
            model.decode(bad)


def test_pixel_values_a_model_cannot_score_are_refused_in_eval_mode():
    """A Bernoulli VAE encoded x * 255 and decode(z).log_prob(x * 255) read +124 nats (a probability above 1);
    NaN went through every model. Training batches (train mode) come checked from their data set."""
    x = torch.rand(4, *SHAPE)
    hvae = small_hvae().eval()
    for name, model in {**image_models(), "hvae": hvae}.items():
        model.eval()
        nan = x.masked_fill(x > 0.5, float("nan"))
        for method in ("encode", "embed", "reconstruct"):
            with pytest.raises(InputError, match=rf"^{method}: x has \d+ NaN or infinite value"):
                getattr(model, method)(nan if name != "hvae" else torch.full((2, *hvae.input_shape), float("nan")))
    for model in (image_models()["vae"].eval(), image_models()["ae"].eval()):
        for method in ("encode", "embed", "reconstruct"):
            with pytest.raises(InputError, match=rf"^{method}: x has values in \[.*\], outside \[0, 1\]; this model's "
                                                 r"Bernoulli likelihood scores values in \[0, 1\]: rescale x"):
                getattr(model, method)(x * 255)
        with pytest.raises(InputError, match=r"^log_prob: x has values in .*, outside \[0, 1\]"):
            model.decode(torch.zeros(4, 3)).log_prob(x * 255)
        assert model.decode(torch.zeros(4, 3)).log_prob(x).max() < 0
        model.train()(x * 255)  # not checked: the trainer's batches were
    gaussian = VAE(input_shape=SHAPE, latent_dim=3, hidden=(8,), likelihood="gaussian").eval()
    gaussian.encode(x * 255)  # any finite values
    gaussian.decode(torch.zeros(4, 3)).log_prob(x * 255)
    learned = VAE(input_shape=SHAPE, latent_dim=3, hidden=(8,), likelihood="gaussian-learned").eval()
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    for model in (gaussian, learned, image_models()["pca"].eval()):  # a Gaussian log_prob of NaN data was NaN
        with pytest.raises(InputError, match=r"^log_prob: x has 1 NaN or infinite value\(s\) out of 144; replace"):
            model.decode(torch.zeros(4, 3)).log_prob(nan)
        assert model.train().decode(torch.zeros(4, 3)).log_prob(nan).isnan().any()  # train mode: not checked
    hvae(torch.rand(2, *hvae.input_shape))
    with pytest.raises(InputError, match=r"^forward: x has values in"):
        hvae(torch.rand(2, *hvae.input_shape) + 1)


def every_family():
    """A small model of each family with encode, embed, reconstruct and forward, in eval mode, and two inputs it
    refuses: one of the wrong shape, and one the eval-mode check refuses (NaN pixels; ids outside the vocabulary)."""
    hvae, x = small_hvae(), torch.rand(2, 1, 12, 12)
    images = {**image_models(), "vmf": VAE(input_shape=SHAPE, latent_dim=3, hidden=(8,), latent="vmf"),
              "bn-vae": VAE(input_shape=SHAPE, latent_dim=3, hidden=(8,), bn_mu=0.5)}
    nan = torch.full((2, *SHAPE), float("nan"))
    return {**{name: (m.eval(), torch.rand(2, 36), nan) for name, m in images.items()},
            "hvae": (hvae.eval(), x.flatten(1), x.masked_fill(x > 0.5, float("nan"))),
            "text-vae": (tiny_model().eval(), torch.tensor([4, 5, 2]), torch.tensor([[4, len(VOCAB), 2]]))}


def test_codes_a_model_cannot_decode_are_refused_in_eval_mode():
    """decode(z) of NaN or infinite codes gave NaN images without a word, in every model; a model's own codes
    (forward, reconstruct, sample) and codes decoded in train mode (no device sync) are not checked."""
    hvae, text = small_hvae(), tiny_model()
    for name, model in {**image_models(), "hvae": hvae, "text": text}.items():
        model.eval()
        z = torch.zeros(2, model.latent_dim)
        args = (torch.tensor([[4, 5, 2], [6, 2, 0]]),) if name == "text" else ()
        model.decode(z, *args)  # finite codes still decode
        for value in (float("nan"), float("inf")):
            bad = z.clone()
            bad[1, 0] = value
            with pytest.raises(InputError, match=r"^decode: z has 1 NaN or infinite value\(s\) out of \d+; pass fin"):
                model.decode(bad, *args)
        model.train()
        model.decode(z.fill_(float("nan")), *args)
    z = torch.zeros(1, text.latent_dim)
    z[0, :2] = float("nan")
    with pytest.raises(InputError, match=r"^greedy: z has 2 NaN"):
        text.eval().greedy(z)
    for model in image_models().values():  # a diverged model's codes are its own: no "decode:" error, as before
        model.eval().load_state_dict({k: v.fill_(float("nan")) for k, v in model.state_dict().items()})
        assert model.reconstruct(torch.rand(2, *SHAPE)).isnan().all() and model(torch.rand(2, *SHAPE)).z.isnan().all()


@pytest.mark.parametrize("name", ["vae", "conv vae", "vmf", "bn-vae", "ae", "pca", "hvae", "text-vae"])
def test_input_errors_name_the_method_called(name):
    """model(x) said "encode: ..." for every family but the hierarchical one; so did embed on a hierarchical VAE,
    and embed and reconstruct on a text VAE."""
    model, wrong_shape, unscorable = every_family()[name]
    for method, call in [("forward", model), ("encode", model.encode), ("embed", model.embed),
                         ("reconstruct", model.reconstruct)]:
        for bad, message in [(wrong_shape, "x has shape"), (unscorable, "x (has .*NaN|holds token ids outside)")]:
            with pytest.raises(InputError, match=f"^{method}: {message}"):
                call(bad)


def test_pca_and_ae_refuse_to_sample_without_a_prior():
    """model.sample(8) on a PCA or AE gave a bare AttributeError; prior() too (the VAE's is p(z))."""
    baselines = [image_models()[name].eval() for name in ("pca", "ae")]
    for model in baselines:
        for method, args in [("sample", (8,)), ("prior", ())]:
            with pytest.raises(InputError, match=rf"^{method}: {type(model).__name__} has no prior p\(z\); train a "
                                                 r"VAE \(--model vae\) to sample$"):
                getattr(model, method)(*args)
    from vaelab.models.common import has_prior  # what the CLI, the explorer and the report ask before sampling

    assert not any(has_prior(m) for m in baselines)
    assert all(has_prior(m) for m in (image_models()["vae"], small_hvae(), tiny_model()))


@pytest.mark.parametrize("n", [-1, 2.5, "3", True, None])
def test_sample_needs_a_whole_number(n):
    model = image_models()["vae"].eval()
    with pytest.raises(InputError, match="sample: n must be a whole number"):
        model.sample(n)


def test_sample_takes_integer_like_counts_and_zero():
    model = image_models()["vae"].eval()
    assert model.sample(np.int64(3)).shape == (3, *SHAPE)
    assert model.sample(0).shape == (0, *SHAPE)


def test_hierarchical_model_checks_its_inputs_and_temperature():
    model = small_hvae()
    x = torch.rand(2, 1, 12, 12)
    assert model.reconstruct(x).shape == x.shape and model.sample(2, temperature=0.5).shape == x.shape
    for method in (model.encode, model.reconstruct, model.group_means, model):
        with pytest.raises(InputError, match=r"\(B, 1, 12, 12\)"):
            method(torch.rand(2, 144))
    with pytest.raises(InputError, match=f"decode: .*{model.latent_dim} dimensions"):
        model.decode(torch.zeros(2, model.latent_dim + 1))
    for method in (model.encode, model.reconstruct, model.group_means, model):
        with pytest.raises(InputError, match="dtype torch.float64, but this model's weights are torch.float32"):
            method(x.double())
    with pytest.raises(InputError, match="decode: z has dtype torch.float64"):
        model.decode(torch.zeros(2, model.latent_dim, dtype=torch.float64))
    for t in (-0.5, float("nan"), float("inf"), 1e6, "hot", True, torch.tensor([0.5, 1.0])):  # 1e6: NaN images
        with pytest.raises(InputError, match=r"temperature must be a number in \[0, 10\]"):
            model.sample(2, temperature=t)
    torch.manual_seed(0)
    expected = model.sample(2, temperature=0.5)
    for t in (np.float32(0.5), torch.tensor(0.5)):  # were refused as not numbers
        torch.manual_seed(0)
        torch.testing.assert_close(model.sample(2, temperature=t), expected)
    with pytest.raises(InputError, match="whole number"):
        model.sample(-2)


def test_text_model_checks_token_ids_and_codes():
    model = tiny_model().eval()
    x = torch.tensor([[4, 5, 6, 2, 0, 0, 0, 0]])
    assert model.reconstruct(x).shape == (1, 8)
    for bad, message in [(x[0], r"shape \(8,\).*\(B, T\).*x\[None\]"), (x.float(), "dtype torch.float32.*integer"),
                         (x + len(VOCAB), f"outside this model's vocabulary \\(0..{len(VOCAB) - 1}\\)"),
                         (x - 10, "outside")]:
        with pytest.raises(InputError, match=f"encode: .*{message}"):
            model.encode(bad)
    with pytest.raises(InputError, match="decode: z has shape"):
        model.decode(torch.zeros(1, 5), x)
    with pytest.raises(InputError, match=r"greedy: z has shape \(2, 1, 4\)"):
        model.greedy(torch.zeros(2, 1, 4))
    with pytest.raises(InputError, match=r"greedy: z has dtype torch.float64.*z.to\(torch.float32\)"):
        model.greedy(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(InputError, match="whole number"):
        model.sample(-1)
    model.train()  # training batches come from the data set's vocabulary: no value check (a GPU sync)
    model.encode(x)


def test_text_model_takes_integer_ids_of_any_width_and_scores_only_the_sentence_it_read():
    """int32 ids failed in cross_entropy, int16 in the embedding, uint8 ids were checked in uint8 arithmetic;
    decode(z, x).log_prob(y) scored y against x's history; a z per other batch size, a 1-D z, sentences of no
    tokens and greedy(max_len=-1) failed deep in torch, and max_len=0 meant the model's length."""
    model = tiny_model().eval()
    x = torch.randint(3, len(VOCAB), (3, 8), generator=torch.Generator().manual_seed(0))
    z = model.embed(x)
    expected = model.decode(z, x).log_prob(x)
    for dtype in (torch.int32, torch.int16, torch.uint8, torch.int8):
        torch.testing.assert_close(model.decode(z, x.to(dtype)).log_prob(x.to(dtype)), expected)
        torch.testing.assert_close(model.embed(x.to(dtype)), z)
    wide = TextVAE(input_shape=(4,), latent_dim=2, hidden=(8,), vocab_size=300, embedding_dim=4).eval()
    wide.encode(torch.tensor([[299, 3, 0, 0]], dtype=torch.int16))
    with pytest.raises(InputError, match="outside this model's vocabulary"):
        wide.encode(torch.tensor([[300 + 256, 3, 0, 0]], dtype=torch.int16))
    with pytest.raises(InputError, match=r"^log_prob: these are not the tokens decode\(z, x\) read"):
        model.decode(z, x).log_prob(x.flip(0))
    torch.testing.assert_close(model.decode(z, x).log_prob(x.clone()), expected)  # an equal copy is the same
    for bad_z in (torch.zeros(2, 4), torch.zeros(4)):
        with pytest.raises(InputError, match=r"^decode: z has shape .* for x of 3 sentence\(s\)"):
            model.decode(bad_z, x)
    assert model.decode(torch.zeros(5, 3, 4), x).log_prob(x).shape == (5, 3)
    with pytest.raises(InputError, match=r"^encode: x has shape \(3, 0\): sentences of no tokens"):
        model.encode(x[:, :0])
    for max_len in (-1, 0, 2.0):
        with pytest.raises(InputError, match="^greedy: max_len must be a whole number"):
            model.greedy(z, max_len=max_len)
    assert model.greedy(z, max_len=3).shape == (3, 3)


def test_input_errors_are_value_errors_and_vaelab_errors():
    assert issubclass(InputError, ValueError) and issubclass(InputError, VaelabError)


def test_a_model_converted_to_double_takes_double_inputs_and_refuses_float():
    model = image_models()["vae"].double().eval()
    x = torch.rand(4, *SHAPE, dtype=torch.float64)
    assert model.reconstruct(x).dtype == torch.float64
    with pytest.raises(InputError, match="dtype torch.float32, but this model's weights are torch.float64"):
        model.encode(x.float())


def test_the_prior_is_made_once_and_follows_the_model_when_it_is_converted():
    model = image_models()["vae"]
    prior = model.prior()
    assert model.prior() is prior and model(torch.rand(2, *SHAPE)).pz is prior  # not rebuilt every step
    model.double()  # new buffers: a new prior, of their dtype
    assert model.prior() is not prior and model.prior().base_dist.loc.dtype == torch.float64
    x = torch.rand(2, *SHAPE, dtype=torch.float64)
    assert model(x).kl().dtype == torch.float64
    model.load_state_dict(model.state_dict(), assign=True)  # (zero and one are not in the state dict)
    assert model.prior().base_dist.loc is model.posterior.zero


def test_the_model_tensor_is_its_first_parameter_or_else_its_first_buffer():
    for name, model in image_models().items():
        first = next(model.parameters(), None) if name != "pca" else next(model.buffers())
        assert model_tensor(model) is first, name
    deep = nn.Sequential(nn.Sequential(nn.Identity()), nn.BatchNorm1d(2, affine=False), nn.Linear(2, 2))
    assert model_tensor(deep) is deep[2].weight  # a parameter after a buffer: the parameter
    deep[2] = nn.Identity()
    assert model_tensor(deep) is deep[1].running_mean and model_tensor(nn.ReLU()) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inputs_on_another_device_are_refused_by_name():
    model = image_models()["vae"].cuda().eval()
    with pytest.raises(InputError, match="x is on cpu, but this model is on cuda:0: pass x.to\\('cuda:0'\\)"):
        model.encode(torch.rand(4, *SHAPE))


def test_importance_sampling_refuses_empty_mistyped_or_impossible_data_and_restores_the_mode():
    from vaelab.density import importance_sample

    model = image_models()["vae"].train()
    for bad, message in [(torch.zeros(0, *SHAPE), r"non-empty batch.*\(0, 1, 6, 6\)"),
                         (np.zeros((2, *SHAPE)), "ndarray"), (torch.rand(2, *SHAPE).double(), "float64"),
                         (torch.full((2, *SHAPE), float("nan")), "NaN or infinite"),
                         (torch.full((2, *SHAPE), 3.0), r"values in \[3, 3\].*Bernoulli.*\[0, 1\]")]:
        with pytest.raises(InputError, match=message):
            importance_sample(model, bad, k=4)
        assert model.training  # the model's mode is restored on failure too
    for arguments, message in [({"k": 0}, r"k must be an integer from 1 to 2\*\*63 - 1, got 0"),
                               ({"k": 2.5}, "k must be"), ({"k": True}, "k must be"),
                               ({"k": 4, "chunk": 0}, "chunk must be an integer from 1"),
                               ({"k": 4, "batch_size": -1}, "batch_size must be"),
                               ({"k": 4, "seed": -1}, "seed must be an integer >= 0, got -1"),
                               ({"k": 2**63}, r"k must be an integer from 1 to 2\*\*63 - 1, got 9223372036854775808")]:
        with pytest.raises(InputError, match=message):  # were TypeErrors from inside, or silently clamped to 1
            importance_sample(model, torch.rand(2, *SHAPE), **arguments)
    with pytest.raises(InputError, match="meta device"):  # was "Tensor.item() cannot be called on meta tensors"
        importance_sample(model, torch.rand(2, *SHAPE, device="meta"), k=4)


def test_pca_log_likelihood_checks_its_data_as_importance_sampling_does():
    from vaelab.density import log_likelihood

    pca = image_models()["pca"]
    for bad, message in [(torch.full((2, *SHAPE), float("nan")), "log_likelihood: x has 72 NaN"),
                         (torch.zeros(0, *SHAPE), "non-empty batch"),  # were NaNs and an empty tensor
                         (np.zeros((2, *SHAPE)), "as a torch.Tensor, got ndarray"),  # was "PCA's ... log_likelihood"
                         (torch.rand(2, *SHAPE, device="meta"), "meta device")]:
        with pytest.raises(InputError, match=message):
            log_likelihood(pca, bad)


def test_vmf_point_codes_are_mean_directions_on_the_sphere():
    from torch.distributions import kl_divergence

    model = VAE(input_shape=SHAPE, latent_dim=3, hidden=(8,), latent="vmf").eval()
    x = torch.rand(4, *SHAPE)
    codes = model.embed(x)
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(4))  # the vMF mean A(kappa) loc lies inside
    torch.testing.assert_close(codes, model.encode(x).loc)
    torch.testing.assert_close(model.reconstruct(x), model.decode(codes).mean)
    prior = model.prior()  # the uniform prior expands like every distribution (NotImplementedError before)
    qz = model.encode(x)
    torch.testing.assert_close(kl_divergence(qz, prior.expand((4,))), kl_divergence(qz, prior))
    assert prior.expand((4,)).rsample((2,)).shape == (2, 4, 3) and prior.expand((4,)).entropy().shape == (4,)
    gaussian = VAE(input_shape=SHAPE, latent_dim=3, hidden=(8,)).eval()
    torch.testing.assert_close(gaussian.embed(x), gaussian.encode(x).mean)  # a Gaussian's mode is its mean


def test_helpers_give_a_model_back_in_the_mode_it_had():
    """Text views, latent statistics and the reconstruction error left a model in training in eval mode (no
    dropout, frozen batch-norm statistics from then on)."""
    from vaelab import latent_stats, text_views
    from vaelab.density import importance_sample
    from vaelab.evaluate import reconstruction_error

    text = tiny_model(word_dropout=0.3).train()
    tokens = torch.randint(3, len(VOCAB), (4, 8))
    for call in (lambda: text_views.samples(text, VOCAB, 2), lambda: text_views.reconstructions(text, tokens, VOCAB),
                 lambda: text_views.interpolation(text, tokens[0], tokens[1], VOCAB, steps=3),
                 lambda: text_views.token_accuracy(text, tokens)):
        call()
        assert text.training
    vae = VAE(input_shape=SHAPE, latent_dim=3, hidden=(8,), bn_mu=0.5).train()
    x = torch.rand(6, *SHAPE)
    for call in (latent_stats.codes, latent_stats.posterior_means, latent_stats.kl_per_unit, latent_stats.active_units,
                 latent_stats.mutual_information_bounds, reconstruction_error,
                 lambda model, x: importance_sample(model, x, k=2)):
        call(vae, x)
        assert vae.training, call
    with pytest.raises(InputError):  # and when the model refuses the input
        latent_stats.codes(vae, x * 255)
    assert vae.training


def test_an_empty_batch_is_scored_by_every_likelihood():
    """A Gaussian's Independent.log_prob reshaped to (0, -1), which torch refuses; Bernoulli's gave an empty result."""
    for model in (*image_models().values(), VAE(input_shape=SHAPE, latent_dim=3, hidden=(8,), likelihood="gaussian")):
        assert model.eval().decode(torch.zeros(0, 3)).log_prob(torch.rand(0, *SHAPE)).shape == (0,)


def test_vmf_interpolations_and_traversals_stay_on_the_sphere(monkeypatch):
    """The figures interpolated on the straight line, whose midpoints lie inside the sphere (norm cos(theta/2)),
    and traversals moved one coordinate off it: codes a vMF decoder never saw."""
    from vaelab import figures, text_views
    from vaelab.vmf import codes_between

    model = VAE(input_shape=SHAPE, latent_dim=3, hidden=(8,), latent="vmf").eval()
    decoded = []
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda z: decoded.append(z) or decode(z))
    x = torch.rand(4, *SHAPE)
    figures.interpolations(model, x[:2], x[2:], steps=5)
    figures.traversals(model, x[:1], [0, 2], scale=torch.ones(3))
    for z in decoded:
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(z.shape[:-1]))
    za, zb = model.embed(x[:2]), model.embed(x[2:])
    path = decoded[0][:5]  # the first pair's row
    torch.testing.assert_close(path[[0, -1]], torch.stack([za[0], zb[0]]))
    steps = (path[1:] * path[:-1]).sum(-1).clamp(-1, 1).acos()  # equal angles: constant speed on the circle
    torch.testing.assert_close(steps, steps[:1].expand(4), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(codes_between(model, za, za, torch.tensor([[0.5]])), za)  # the same point
    half = codes_between(model, za, -za, torch.tensor([[0.5]]))  # opposite points: the line passed through 0
    torch.testing.assert_close(half.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close((half * za).sum(-1), torch.zeros(2), atol=1e-6, rtol=0)
    gaussian = VAE(input_shape=SHAPE, latent_dim=3, hidden=(8,)).eval()  # others: the straight line
    torch.testing.assert_close(codes_between(gaussian, za, zb, torch.tensor([[0.25]])), 0.75 * za + 0.25 * zb)
    text = tiny_model(latent="vmf")
    greedy = text.greedy
    seen = []
    monkeypatch.setattr(text, "greedy", lambda z: seen.append(z) or greedy(z))
    tokens = torch.randint(3, len(VOCAB), (2, 8))
    text_views.interpolation(text, tokens[0], tokens[1], VOCAB, steps=5)
    torch.testing.assert_close(seen[0].norm(dim=-1), torch.ones(5))


def test_importance_sampling_takes_any_finite_values_under_a_gaussian_likelihood():
    from vaelab.density import importance_sample

    model = VAE(input_shape=SHAPE, latent_dim=3, hidden=(8,), likelihood="gaussian")
    assert importance_sample(model, torch.randn(2, *SHAPE) * 5, k=4).log_px.shape == (2,)

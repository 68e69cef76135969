"""Text: the fortunes corpus and its tokeniser, and the sentence VAE (likelihood, word dropout, bounds, runs)."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import vaelab
from vaelab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelab.data import Dataset, Split, load_dataset
from vaelab.data.text import (
    BOS,
    EOS,
    FORTUNES_DIR,
    PAD,
    SPECIALS,
    UNK,
    build_vocab,
    encode,
    load_fortunes,
    read_sentences,
    split_sentences,
    text_to_tokens,
    token_counts,
    tokenize,
    tokens_to_text,
)
from vaelab.density import log_likelihood
from vaelab.errors import ConfigError, DataError
from vaelab.models import build_model
from vaelab.models.text_vae import TextVAE, TokenSequence
from vaelab.objectives import elbo, iwae

needs_fortunes = pytest.mark.skipif(not (FORTUNES_DIR / "fortunes").is_file(),
                                    reason=f"the fortunes corpus is not installed ({FORTUNES_DIR}); "
                                           "`apt-get install fortunes` to run this test")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny RNN steps are latency-bound (conftest.one_thread)


# ---------------------------------------------------------------- tokeniser and corpus


def test_tokenize_keeps_apostrophes_and_numbers_and_splits_punctuation():
    assert tokenize("Don't PANIC -- it's 3.14, or 186,282!") == [
        "don't", "panic", "-", "-", "it's", "3.14", ",", "or", "186,282", "!"]


def test_sentences_are_split_and_attributions_dropped(tmp_path):
    (tmp_path / "fortunes").write_text(
        "A \"critic\" is a man who creates nothing. He feels qualified to judge.\n"
        "\t\t-- Robert Heinlein\n%\n"
        "\"Why me?\" he asked the cat. Mr. Smith knows why.\n%\n"
        "Too short.\n%\n"
        "_\bB_\bo_\bl_\bd words are underlined in old files.\n%\n"
        "Four tokens here.\n%\n"  # the shortest kept; "Too short." (3) is dropped
        + " ".join(f"w{i}" for i in range(19)) + ".\n%\n"  # 20 tokens, the longest kept
        + " ".join(f"v{i}" for i in range(20)) + ".\n"  # 21: dropped
    )
    assert read_sentences(tmp_path) == [
        ("a", '"', "critic", '"', "is", "a", "man", "who", "creates", "nothing", "."),
        ("he", "feels", "qualified", "to", "judge", "."),
        ('"', "why", "me", "?", '"', "he", "asked", "the", "cat", "."),
        ("mr", ".", "smith", "knows", "why", "."),
        ("bold", "words", "are", "underlined", "in", "old", "files", "."),
        ("four", "tokens", "here", "."),
        (*(f"w{i}" for i in range(19)), "."),
    ]


def test_missing_corpus_names_the_package(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install fortunes"):
        load_fortunes(tmp_path / "nowhere")
    (tmp_path / "fortunes").write_text("One sentence of some words.\n%\nAnother sentence of words.\n")
    with pytest.raises(DataError, match=r"holds 2 usable sentence\(s\); give at least 3"):  # (train came back empty)
        load_fortunes(tmp_path)
    (tmp_path / "fortunes").write_text("One sentence of some words.\n%\nAnother sentence of words.\n%\nA third one.\n")
    ds = load_fortunes(tmp_path)  # three are enough: one sentence each
    assert [len(split.x) for split in (ds.train, ds.val, ds.test)] == [1, 1, 1]


def test_vocabulary_keeps_tokens_seen_min_count_times_most_frequent_first():
    sentences = [("b", "a", "c"), ("a", "b", "d", "<unk>"), ("b", "<unk>")]  # b 3, a 2, c and d once
    assert build_vocab(sentences) == SPECIALS + ("b", "a")  # twice is enough (MIN_COUNT 2); specials not again
    assert build_vocab(sentences, min_count=1) == SPECIALS + ("b", "a", "c", "d")  # ties alphabetical


@needs_fortunes
def test_fortunes_splits_are_disjoint_padded_and_use_a_train_only_vocabulary():
    ds = load_dataset("fortunes")
    assert ds is load_fortunes()  # cached in process
    parts = split_sentences(read_sentences())
    sets = {name: set(s) for name, s in parts.items()}
    assert all(len(s) > 0 for s in sets.values())
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert ds.vocab[:4] == SPECIALS and ds.vocab == build_vocab(parts["train"])
    assert ds.shape == (21,)
    for name in ("train", "val", "test"):
        x = getattr(ds, name).x
        assert x.dtype == torch.int64 and len(x) == len(parts[name])
        assert int(x.max()) < len(ds.vocab) and int(x.min()) >= 0
        n = (x != PAD).sum(1)
        assert bool((x[torch.arange(len(x)), n - 1] == EOS).all())  # the last real token is <eos> ...
        assert bool(((x != PAD).cumsum(1) == torch.arange(1, 22).clamp(max=n[:, None])).all())  # ... then padding
        assert bool(((x == EOS).sum(1) == 1).all()) and not bool((x == BOS).any())
        assert bool((4 + 1 <= n).all()) and bool((n <= 20 + 1).all())
    train_tokens = {t for s in parts["train"] for t in s}
    test_only = next((i, t) for i, s in enumerate(parts["test"]) for t in s if t not in train_tokens)
    assert test_only[1] not in ds.vocab
    assert UNK in ds.test.x[test_only[0]].tolist()


@needs_fortunes
def test_fortunes_is_deterministic_and_round_trips_through_text():
    first = load_fortunes()
    load_fortunes.cache_clear()
    again = load_fortunes()
    assert again is not first and again.vocab == first.vocab
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(first, name).x, getattr(again, name).x)
    for row in again.val.x:
        assert torch.equal(text_to_tokens(tokens_to_text(row, again.vocab), again.vocab), row)
    assert tokens_to_text(text_to_tokens("The cat, the hat.", again.vocab), again.vocab) == "the cat, the hat."


# ---------------------------------------------------------------- a tiny synthetic corpus

LETTERS = "abcdefghij"
VOCAB = SPECIALS + tuple(LETTERS)


def tiny_text(n_lengths: int = 5) -> Dataset:
    """Runs of consecutive letters ('a b c', 'b c d e', ...), 3..(2 + n_lengths) long: 10 * n_lengths sentences."""
    sentences = [tuple(LETTERS[(s + i) % 10] for i in range(length))
                 for length in range(3, 3 + n_lengths) for s in range(10)]
    x = encode(sentences, VOCAB, length=3 + n_lengths)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x = x[order]
    return Dataset("tiny-text", train=Split(x[:40]), val=Split(x[40:45]), test=Split(x[45:]), vocab=VOCAB)


def tiny_model(**kw) -> TextVAE:
    torch.manual_seed(0)
    args = {"input_shape": (8,), "latent_dim": 4, "hidden": (32,), "vocab_size": len(VOCAB), "embedding_dim": 16,
            **kw}
    return TextVAE(**args)


def test_text_to_tokens_maps_unknown_words_and_pads():
    ids = text_to_tokens("A B zebra", VOCAB, length=6)
    assert ids.tolist() == [VOCAB.index("a"), VOCAB.index("b"), UNK, EOS, PAD, PAD]
    assert tokens_to_text(ids, VOCAB) == "a b <unk>"
    assert token_counts(ids[None]).tolist() == [4.0]
    with pytest.raises(DataError, match="at most 2"):
        text_to_tokens("a b c", VOCAB, length=3)


@pytest.mark.parametrize("net", ["lstm", "gru"])
def test_shapes_with_and_without_samples(net):
    model, x = tiny_model(net=net), tiny_text().train.x[:6]
    out = model(x)
    assert out.z.shape == (6, 4) and out.px_z.batch_shape == (6,) and out.px_z.event_shape == (8,)
    assert out.log_px_z(x).shape == (6,) and out.kl().shape == (6,)
    out = model(x, k=3)
    assert out.z.shape == (3, 6, 4) and out.px_z.logits.shape == (3, 6, 8, len(VOCAB))
    assert out.log_px_z(x).shape == (3, 6) and out.log_qz().shape == (3, 6) and out.log_pz().shape == (3, 6)
    assert model.embed(x).shape == (6, 4) and model.sample(5).shape == (5, 8) and model.reconstruct(x).shape == (6, 8)


def test_token_sequence_log_prob_is_the_cross_entropy_over_real_positions():
    x = tiny_text().train.x[:7]
    logits = torch.randn(7, 8, len(VOCAB))
    expected = -F.cross_entropy(logits.transpose(1, 2), x, ignore_index=PAD, reduction="none").sum(1)
    torch.testing.assert_close(TokenSequence(logits, x != PAD).log_prob(x), expected)
    # K samples: the (B, T) data is scored against each of the (K, B, T, V) logits
    logits_k = torch.randn(2, 7, 8, len(VOCAB))
    got = TokenSequence(logits_k, (x != PAD).expand(2, -1, -1)).log_prob(x)
    torch.testing.assert_close(got, torch.stack([TokenSequence(lk, x != PAD).log_prob(x) for lk in logits_k]))


def test_padding_changes_nothing():
    model, x = tiny_model().eval(), tiny_text().train.x[:10]
    z = model.embed(x)
    noisy = torch.where(x == PAD, torch.randint(4, len(VOCAB), x.shape), x)  # junk after each <eos>
    px_z = model.decode(z, x)
    torch.testing.assert_close(px_z.log_prob(noisy), px_z.log_prob(x), rtol=0, atol=0)
    # the decoder is causal: what follows the <eos> does not reach the real positions' logits
    real = x != PAD
    torch.testing.assert_close(model.decode(z, noisy).logits[real], px_z.logits[real])


def test_elbo_training_lowers_the_reconstruction_cross_entropy():
    model, x = tiny_model(), tiny_text().train.x
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)

    def recon_per_token() -> float:
        model.eval()
        with torch.no_grad():
            value = float(-model(x).log_px_z(x).sum() / token_counts(x).sum())
        model.train()
        return value

    before = recon_per_token()
    for _ in range(250):
        loss = elbo(model(x), x)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = recon_per_token()
    assert before > 2.0  # about log(V) = 2.6 nats per token untrained
    assert after < 0.5 * before, (before, after)


def test_word_dropout_of_one_or_more_is_refused_with_its_reason():
    for p in (1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"--word-dropout must be in \[0, 1\), got .* never read a word in "
                                              r"training, yet evaluation"):
            ModelConfig(model="text-vae", word_dropout=p)
    assert ModelConfig(model="text-vae", word_dropout=0.99).word_dropout == 0.99


def test_word_dropout_hides_history_in_training_only():
    model, x = tiny_model(word_dropout=1.0), tiny_text().train.x[:8]
    seen = []
    model.embedding.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model.train()
    model(x)
    decoder_inputs = seen[-1]  # the encoder embeds first, the decoder second
    assert decoder_inputs.shape == x.shape
    assert bool((decoder_inputs[:, 0] == BOS).all()) and bool((decoder_inputs[:, 1:] == UNK).all())
    model.eval()
    model(x)
    assert torch.equal(seen[-1], torch.cat([torch.full_like(x[:, :1], BOS), x[:, :-1]], 1))


def test_greedy_decodes_end_in_eos_then_padding():
    model = tiny_model()
    tokens = model.greedy(torch.randn(16, 4) * 3)
    assert tokens.shape == (16, 8)
    n = (tokens != PAD).sum(1)
    assert bool((tokens[torch.arange(16), n - 1] == EOS).all()) and bool(((tokens == EOS).sum(1) == 1).all())
    assert bool(((tokens != PAD).cumsum(1) == torch.arange(1, 9).clamp(max=n[:, None])).all())
    assert not bool((tokens == BOS).any())
    assert model.greedy(torch.randn(3, 4), max_len=2).shape == (3, 2)


def test_iwae_with_one_sample_equals_the_mc_elbo_and_estimates_do_not_depend_on_the_chunk():
    model, x = tiny_model().eval(), tiny_text().test.x
    out = model(x, k=1)
    torch.testing.assert_close(iwae(out, x)["loss"], elbo(out, x, kl="mc")["loss"], rtol=0, atol=0)
    a = log_likelihood(model, x, k=20, chunk=20)
    b = log_likelihood(model, x, k=20, chunk=7)
    assert a.shape == (len(x),) and bool(torch.isfinite(a).all())
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_trains_saves_and_reloads(tmp_path):
    config = RunConfig(data=DataConfig(name="tiny-text"),
                       model=ModelConfig(model="text-vae", hidden=(32,), latent_dim=4, embedding_dim=16),
                       train=TrainConfig(epochs=2, batch_size=16))
    data = tiny_text()
    model = vaelab.train(config, tmp_path / "run", dataset=data, progress=False)
    loaded = vaelab.load(tmp_path / "run")
    assert isinstance(loaded, TextVAE) and loaded.vocab_size == len(VOCAB) and loaded.input_shape == (8,)
    x = data.test.x
    torch.testing.assert_close(loaded.decode(loaded.embed(x), x).log_prob(x),
                               model.decode(model.embed(x), x).log_prob(x), rtol=0, atol=0)
    torch.testing.assert_close(log_likelihood(loaded, x, k=5), log_likelihood(model, x, k=5), rtol=0, atol=0)


def test_evaluate_gives_a_text_run_per_token_nll_and_perplexity_not_bits_per_dimension(tmp_path):
    """A sentence's NLL is per token (its real tokens, not its padded length), and its perplexity exp of that."""
    from vaelab.evaluate import evaluate_run

    config = RunConfig(data=DataConfig(name="tiny-text"),
                       model=ModelConfig(model="text-vae", hidden=(32,), latent_dim=4, embedding_dim=16),
                       train=TrainConfig(epochs=1, batch_size=16))
    data = tiny_text()
    vaelab.train(config, tmp_path / "run", dataset=data, progress=False)
    result = evaluate_run(tmp_path / "run", nll_k=5, probe=False, data=data, write=False)
    tokens = float(token_counts(data.test.x).sum())
    assert tokens < data.test.x.numel()  # (padding: per dimension would divide by more)
    assert result["nll_per_token"] == pytest.approx(result["nll"] * len(data.test.x) / tokens, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["nll_per_token"]), rel=1e-9)
    assert "nll_bits_per_dim" not in result


def test_report_interpolations_name_the_sentences_they_run_between():
    from vaelab.text_views import html_sections

    x = tiny_text().train.x[:14]
    page = html_sections(tiny_model(), x, VOCAB)
    pick = torch.randperm(14, generator=torch.Generator().manual_seed(0))  # the sections' own choice, seed 0
    for i in (10, 12):  # an untrained decoder's first and last lines are not these sentences
        ends = [tokens_to_text(x[pick[j]], VOCAB) for j in (i, i + 1)]
        assert f"From <q>{ends[0]}</q> to <q>{ends[1]}</q>:</p><ol>" in page


def test_an_empty_decode_shows_as_empty_not_as_a_blank_list_item(monkeypatch):
    from vaelab import text_views

    monkeypatch.setattr(text_views, "samples", lambda model, vocab, n: ["", "a b"])
    page = text_views.html_sections(tiny_model(), tiny_text().train.x[:14], VOCAB)
    assert "<li><em>(empty)</em></li><li>a b</li>" in page and "<li></li>" not in page


def test_bn_mu_builds_and_trains_a_step():
    config = ModelConfig(model="text-vae", hidden=(16,), latent_dim=3, embedding_dim=8, latent="gaussian",
                         bn_mu=0.5, word_dropout=0.3, net="gru", input_shape=(8,), vocab_size=len(VOCAB))
    model = build_model(config)
    assert isinstance(model, TextVAE) and model.word_dropout == 0.3
    x = tiny_text().train.x
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = elbo(model(x), x)["loss"].mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert model.posterior.mean_bn is not None


def test_build_needs_a_vocabulary():
    config = dataclasses.replace(ModelConfig(model="text-vae"), input_shape=(8,))
    with pytest.raises(vaelab.VaelabError, match="vocab_size"):
        build_model(config)


@pytest.mark.parametrize("flags,named", [({"likelihood": "gaussian"}, "--likelihood gaussian"),
                                         ({"likelihood": "gaussian-learned"}, "--likelihood gaussian-learned"),
                                         ({"linear": True}, "--linear")])
def test_image_only_model_flags_are_refused_for_text(flags, named):
    """They were accepted and ignored: a text run saying --likelihood gaussian in its config.json."""
    with pytest.raises(vaelab.VaelabError, match=f"{named} is for image models.*categorical"):
        ModelConfig(model="text-vae", **flags)
    ModelConfig(model="text-vae")  # the default likelihood field, unused by text models, stays accepted

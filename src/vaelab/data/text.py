"""Text data: sentences of Debian's fortune cookies as padded token ids, a vocabulary, and text <-> ids."""

from __future__ import annotations

import functools
import re
from collections import Counter
from pathlib import Path

import torch

from vaelab.data.dataset import Dataset, Split, fixed_permutation
from vaelab.errors import DataError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# The cookie files of the Debian packages `fortunes` and `fortunes-min` (installed with it). A fixed list,
# so the corpus does not change when other packages (fortunes-de, fortunes-off, ...) add files there.
# ascii-art is left out: its entries are pictures, not prose.
FORTUNE_FILES = (
    "art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education", "ethnic",
    "food", "fortunes", "goedel", "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie", "literature",
    "love", "magic", "medicine", "men-women", "miscellaneous", "news", "paradoxum", "people", "perl", "pets",
    "platitudes", "politics", "pratchett", "riddles", "science", "songs-poems", "sports", "startrek", "tao",
    "translate-me", "wisdom", "work", "zippy",
)

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
MIN_TOKENS, MAX_TOKENS = 4, 20  # sentence lengths kept, in tokens
MIN_COUNT = 2  # train-set occurrences a token needs to enter the vocabulary; rarer ones read as <unk>
SEQ_LEN = MAX_TOKENS + 1  # T: the longest sentence plus its <eos>

# <unk> as typed back by tokens_to_text; numbers with inner separators (3.14, 186,282); words with
# inner apostrophes (don't); any other non-space character is a token of its own.
TOKEN = re.compile(r"<unk>|\d+(?:[.,]\d+)+|[^\W_]+(?:'[^\W_]+)*|[^\w\s]|_")
SENTENCE_END = frozenset(".!?")
CLOSERS = frozenset("\"')]")  # may follow the end of a sentence and still belong to it
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "prof", "no", "vol", "wm"})
ATTRIBUTION = re.compile(r"^(?:\s+--|--\s*[A-Z])")  # "\t\t-- Mark Twain" starts an entry's attribution
OVERSTRIKE = re.compile(r".\x08")  # "_\bw" (underline) and "w\bw" (bold) from the nroff days


def tokenize(text: str) -> list[str]:
    """Lowercased tokens: words (with inner apostrophes), numbers, and each punctuation mark alone."""
    return TOKEN.findall(text.lower())


def _sentences(entry: str) -> list[list[str]]:
    """Token lists of the sentences of one fortune, its attribution lines dropped."""
    lines = entry.splitlines()
    for i, line in enumerate(lines):
        if ATTRIBUTION.match(line):
            lines = lines[:i]  # the attribution and its continuation lines run to the end of the entry
            break
    cased = TOKEN.findall(" ".join(lines))  # case kept until the split: a capital marks a new sentence
    sentences, start, i = [], 0, 0
    while i < len(cased):
        if cased[i] not in SENTENCE_END:
            i += 1
            continue
        previous = cased[i - 1].lower() if i > 0 else ""
        end = i + 1
        while end < len(cased) and (cased[end] in SENTENCE_END or cased[end] in CLOSERS):
            end += 1
        # "Mr. Smith", "U. S. Grant" and '"Why?" he asked' continue the sentence
        nxt = cased[end] if end < len(cased) else ""
        if nxt and (previous in ABBREVIATIONS or len(previous) == 1 and previous.isalpha() or nxt[0].islower()):
            i = end
            continue
        sentences.append([t.lower() for t in cased[start:end]])
        start = i = end
    if start < len(cased):
        sentences.append([t.lower() for t in cased[start:]])
    return sentences


def read_sentences(root: Path = FORTUNES_DIR) -> list[tuple[str, ...]]:
    """The distinct sentences of 4..20 tokens in the fortune files, in file order, as token tuples.

    Args:
        root: the folder with the cookie files.
    """
    files = [root / name for name in FORTUNE_FILES if (root / name).is_file()]
    if not files:
        raise DataError(f"the fortunes corpus is missing ({root}); install it with `apt-get install fortunes`")
    seen: dict[tuple[str, ...], None] = {}  # an ordered set: duplicates keep their first place
    for file in files:
        text = OVERSTRIKE.sub("", file.read_bytes().decode("utf-8", errors="replace"))
        for entry in re.split(r"^%[ \t]*$", text, flags=re.MULTILINE):
            for tokens in _sentences(entry):
                if MIN_TOKENS <= len(tokens) <= MAX_TOKENS and any(t[0].isalpha() for t in tokens):
                    seen.setdefault(tuple(tokens), None)
    return list(seen)


def build_vocab(sentences: list[tuple[str, ...]], min_count: int = MIN_COUNT) -> tuple[str, ...]:
    """The special tokens, then tokens seen at least min_count times by descending count (ties alphabetical)."""
    counts = Counter(t for s in sentences for t in s if t not in SPECIALS)
    kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return SPECIALS + tuple(kept)


def encode(sentences: list[tuple[str, ...]], vocab: tuple[str, ...], length: int = SEQ_LEN) -> torch.Tensor:
    """(N, length) int64: each sentence's ids, then <eos>, then padding; unknown tokens -> <unk>."""
    index = {t: i for i, t in enumerate(vocab)}
    rows = []
    for tokens in sentences:
        if len(tokens) >= length:
            raise DataError(f"a sentence has {len(tokens)} tokens; at most {length - 1} fit (one place is <eos>); "
                            "shorten it")
        rows.append([index.get(t, UNK) for t in tokens] + [EOS] + [PAD] * (length - 1 - len(tokens)))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(sentences), length)


def split_sentences(sentences: list[tuple[str, ...]]) -> dict[str, list[tuple[str, ...]]]:
    """train/val/test lists (80/10/10) after a shuffle that depends only on the number of sentences (SPLIT_SEED)."""
    n = len(sentences)
    n_held = max(1, round(0.1 * n))  # each of val and test
    order = fixed_permutation(n).tolist()
    cuts = {"train": order[:n - 2 * n_held], "val": order[n - 2 * n_held:n - n_held], "test": order[n - n_held:]}
    return {name: [sentences[i] for i in rows] for name, rows in cuts.items()}


@functools.lru_cache(maxsize=4)
def load_fortunes(root: Path = FORTUNES_DIR) -> Dataset:
    """Sentences of Debian's fortune cookies: (N, 21) token ids, split 80/10/10, vocabulary from train only.

    The split is a fixed shuffle, independent of any run's seed; repeated calls return the same tensors.

    Args:
        root: the folder with the cookie files (the `fortunes` package's /usr/share/games/fortunes).
    """
    sentences = read_sentences(Path(root))
    if len(sentences) < 3:  # (an empty training split came back without a word)
        raise DataError(f"{root} holds {len(sentences)} usable sentence(s); give at least 3 (one each for train, "
                        "val and test)")
    parts = split_sentences(sentences)
    vocab = build_vocab(parts["train"])  # held-out words must stay unknown, as they would be for new text
    return Dataset("fortunes", vocab=vocab, **{name: Split(encode(s, vocab)) for name, s in parts.items()})


def token_counts(x: torch.Tensor) -> torch.Tensor:
    """Tokens per sequence that the likelihood scores (words and <eos>, not padding): (N,) float, for perplexity."""
    return (x != PAD).sum(-1).to(torch.get_default_dtype())


def tokens_to_text(ids: torch.Tensor | list[int], vocab: tuple[str, ...]) -> str:
    """The tokens of one row up to its <eos>, padding skipped, joined by spaces (none before , . ! ? ; :).

    Args:
        ids: token ids of one sequence, e.g. a row of a Dataset split or of TextVAE.greedy().
        vocab: the data set's vocabulary.
    """
    words: list[str] = []
    for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
        if i == EOS:
            break
        if i == PAD:
            continue
        token = vocab[i]
        if words and token in {",", ".", "!", "?", ";", ":"}:
            words[-1] += token  # retokenising splits it off again, so the round trip holds
        else:
            words.append(token)
    return " ".join(words)


def text_to_tokens(text: str, vocab: tuple[str, ...], length: int = SEQ_LEN) -> torch.Tensor:
    """(length,) int64 ids of `text`, tokenised as the corpus, then <eos> and padding; unknown words -> <unk>.

    Args:
        text: a sentence (any case).
        vocab: the data set's vocabulary.
        length: T, the data's sequence length; the text may have at most T - 1 tokens.
    """
    return encode([tuple(tokenize(text))], vocab, length)[0]

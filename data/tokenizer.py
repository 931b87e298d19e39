"""Tokenizers: a built-in byte-level one that needs no files, and a Hugging Face ``tokenizer.json``."""

from __future__ import annotations

import os

import numpy as np

from glm5_jax.errors import ConfigError


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258 after three specials: PAD 0, EOS 1, BOS 2.

    259 ids fit the tiny preset (vocab_size 512, pad_token_id 0, eos_token_id 1); nothing to download,
    every string round-trips, and no text can be out of vocabulary.
    """

    pad_id, eos_id, bos_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.offset

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        data = (ids[ids >= self.offset] - self.offset).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` loaded through the ``tokenizers`` library.

    The loaded tokenizer is dropped when pickled and reloaded on first use, so Grain worker processes
    each load their own copy instead of receiving a Rust object through a pipe.
    """

    name = "hf"

    def __init__(self, path: str, eos_id: int | None = None, eos_token: str | None = None,
                 pad_id: int | None = None):
        if not os.path.isfile(path):
            raise ConfigError(f"tokenizer.path: {path}: no such file")
        self.path = path
        tok = self._tokenizer
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        if eos_id is None:
            if eos_token is None:
                raise ConfigError("tokenizer: an hf tokenizer needs eos_id or eos_token (the id put between "
                                  "documents)")
            eos_id = tok.token_to_id(eos_token)
            if eos_id is None:
                raise ConfigError(f"tokenizer.eos_token: {eos_token!r} is not in {path}")
        if not 0 <= eos_id < self.vocab_size:
            raise ConfigError(f"tokenizer.eos_id: must lie in [0, {self.vocab_size}); got {eos_id}")
        self.eos_id = int(eos_id)
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        if not 0 <= self.pad_id < self.vocab_size:
            raise ConfigError(f"tokenizer.pad_id: must lie in [0, {self.vocab_size}); got {self.pad_id}")

    @property
    def _tokenizer(self):
        tok = self.__dict__.get("_tok")
        if tok is None:
            from tokenizers import Tokenizer

            try:
                tok = Tokenizer.from_file(self.path)
            except Exception as e:  # noqa: BLE001 - the Rust side raises a plain Exception for a malformed file
                raise ConfigError(f"tokenizer.path: {self.path}: not a readable tokenizer.json ({e})") from None
            self.__dict__["_tok"] = tok
        return tok

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_tok", None)
        return state

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def build_tokenizer(cfg) -> ByteTokenizer | HFTokenizer:
    """The tokenizer a :class:`~glm5_jax.data.config.TokenizerConfig` names."""
    if cfg.kind == "bytes":
        return ByteTokenizer()
    return HFTokenizer(os.path.expanduser(os.path.expandvars(cfg.path)), eos_id=cfg.eos_id,
                       eos_token=cfg.eos_token, pad_id=cfg.pad_id)


def train_bpe(texts, vocab_size: int, path: str, eos_token: str = "<|endoftext|>") -> str:
    """Train a byte-level BPE ``tokenizer.json`` on an iterable of strings (for tests and benchmarks).

    Byte-level pre-tokenization means any text encodes; ``eos_token`` is added as a special token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(path)
    return path

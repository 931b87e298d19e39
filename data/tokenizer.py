"""Tokenizers: a built-in byte-level one that needs no files, and a Hugging Face ``tokenizer.json``."""

from __future__ import annotations

import os

import numpy as np

from glm5_jax.errors import ConfigError


# The chat markers of GLM-5's chat format (docs/post-training.md), ids 259, 260, ... of the byte tokenizer.
CHAT_TOKENS = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>",
               "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
               "<tool_response>", "</tool_response>")


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258 after three specials: PAD 0, EOS 1, BOS 2; then GLM-5's chat markers as
    named special tokens 259..274 (`CHAT_TOKENS`), which plain text never produces.

    275 ids fit the tiny preset (vocab_size 512, pad_token_id 0, eos_token_id 1); nothing to download,
    every string round-trips, and no text can be out of vocabulary.
    """

    pad_id, eos_id, bos_id = 0, 1, 2
    offset = 3
    chat_offset = 256 + offset
    vocab_size = chat_offset + len(CHAT_TOKENS)
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.offset

    def special_id(self, text: str) -> int:
        """Id of a chat marker such as ``<|user|>``."""
        if text not in CHAT_TOKENS:
            raise ConfigError(f"tokenizer: the byte tokenizer has no special token {text!r}; it has "
                              f"{', '.join(CHAT_TOKENS)}")
        return self.chat_offset + CHAT_TOKENS.index(text)

    def decode(self, ids) -> str:
        """Text of ids; chat markers as their text (ids past the vocabulary as ``<id>``), PAD / EOS / BOS left
        out."""
        ids = np.asarray(ids)
        marks = np.flatnonzero(ids >= self.chat_offset)
        parts, start = [], 0
        for m in [*marks, len(ids)]:
            piece = ids[start:m]
            parts.append((piece[piece >= self.offset] - self.offset).astype(np.uint8).tobytes().decode(
                "utf-8", errors="replace"))
            if m < len(ids):
                parts.append(self.token_text(ids[m]))
            start = m + 1
        return "".join(parts)

    def token_text(self, token_id: int) -> str:
        """Text of one id for display; specials in angle brackets."""
        token_id = int(token_id)
        if token_id >= self.chat_offset:
            return CHAT_TOKENS[token_id - self.chat_offset] if token_id < self.vocab_size else f"<{token_id}>"
        specials = {self.pad_id: "<pad>", self.eos_id: "<eos>", self.bos_id: "<bos>"}
        return specials.get(token_id) or bytes([token_id - self.offset]).decode("latin-1")


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

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, index of each token's first character in ``text``), specials of the text included."""
        enc = self._tokenizer.encode(text, add_special_tokens=False)
        return np.asarray(enc.ids, np.int32), np.asarray([s for s, _ in enc.offsets], np.int64)

    def special_id(self, text: str) -> int:
        """Id of an added (special) token by its text, e.g. ``<|user|>``."""
        token_id = self._tokenizer.token_to_id(text)
        if token_id is None:
            raise ConfigError(f"tokenizer.path: {self.path} has no token {text!r} (the chat format needs it as an "
                              f"added token)")
        return int(token_id)

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

"""Documents -> token arrays -> packed rows of one stage's sequence length -> the batch contract.

Packing is Grain's ``ConcatThenSplitIterDataset``: documents (each followed by EOS) are laid end to end and
cut into rows of ``seq_len``; a document that does not fit is split and its remainder starts the next row.
Grain numbers the pieces of a row 1, 2, ... (``segment_ids``; 0 = padding) and restarts ``positions`` at 0
for every piece, which is exactly what the model's attention mask and RoPE need. A row therefore never has
padding unless the data ends; efficiency is still measured, not assumed.

Batch contract (all ``int32``, shape ``[batch, seq_len]``):

- ``input_ids``: token ids; padding holds the tokenizer's pad id.
- ``segment_ids``: 1, 2, ... per document piece in the row; 0 at padding.
- ``positions``: 0, 1, ... restarting at every piece (RoPE positions).
- ``targets``: the next token of the same piece, or ``IGNORE`` (-1) where there is none: the last token
  of a piece (a document's EOS, or the cut of a split document) and padding. Loss is
  ``mean over targets != IGNORE``; targets never cross documents.
"""

from __future__ import annotations

import threading

import numpy as np

from glm5_jax.errors import DataError

from .errors import MAX_CONSECUTIVE_SKIPS, Bad, ErrorPolicy

IGNORE = -1  # target of tokens that predict nothing (end of a piece, padding)
KEYS = ("input_ids", "targets", "segment_ids", "positions")


class Encoder:
    """Source record -> ``{"input_ids": int32[n]}`` (document + EOS), or None for a skipped bad record.

    ``limit`` bounds the bad records in a row: a source that yields no usable record among that many is one
    :class:`DataError` naming the source, the last file and position and the reason, instead of an endless
    loop of skips (the packer would wait for a document forever). The pipeline sets it to twice the records
    a reader can cycle through, so a source with any usable record never reaches it.
    """

    def __init__(self, source: str, tokenizer, policy: ErrorPolicy, append_eos: bool = True,
                 limit: int = MAX_CONSECUTIVE_SKIPS):
        self.source, self.tokenizer, self.policy, self.append_eos = source, tokenizer, policy, append_eos
        self.limit = limit
        self._in_a_row = 0
        self._lock = threading.Lock()

    def __getstate__(self):  # worker processes get their own count and lock
        state = dict(self.__dict__)
        state["_lock"], state["_in_a_row"] = None, 0
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __call__(self, record):
        if record is None:  # a record that is no document (sources.StdlibSource): nothing to count or log
            return None
        if isinstance(record, Bad):
            return self._skip(record)
        where, payload = record
        if isinstance(payload, str):
            if not payload.strip():
                return self._skip(Bad(where, "empty document"))
            ids = self.tokenizer.encode(payload)
        else:
            ids = payload
            if not len(ids):
                return self._skip(Bad(where, "empty document"))
            bad = np.flatnonzero((ids < 0) | (ids >= self.tokenizer.vocab_size))
            if len(bad):
                return self._skip(Bad(where, f"token id {int(ids[bad[0]])} at offset {int(bad[0])} is outside "
                                             f"[0, vocab_size={self.tokenizer.vocab_size})"))
        with self._lock:
            self._in_a_row = 0
        if self.append_eos:
            ids = np.append(ids, np.int32(self.tokenizer.eos_id))
        return {"input_ids": ids.astype(np.int32, copy=False)}

    def _missed(self) -> int:
        """Count one more record in a row that yields nothing; the count so far."""
        with self._lock:
            self._in_a_row += 1
            return self._in_a_row

    def _skip(self, bad: Bad):
        self.policy.handle(self.source, bad)
        n = self._missed()
        if n >= self.limit:
            raise DataError(f"source {self.source}: no usable record in {n} records in a row, so nothing to "
                            f"train on (last: {bad.where}: {bad.reason})")


def pack(ds, seq_len: int):
    """Pack an ``IterDataset`` of ``{"input_ids": int32[n]}`` into rows of ``seq_len`` (Grain's packer)."""
    from grain.experimental import ConcatThenSplitIterDataset

    return ConcatThenSplitIterDataset(ds, length_struct={"input_ids": seq_len})


def pack_whole(ds, seq_len: int, bins: int):
    """Pack ``{"input_ids", "scored"}`` conversations (each at most ``seq_len``) into rows without splitting
    any: Grain's first-fit packer over ``bins`` open rows, which are padded and emitted together once a
    conversation fits none of them."""
    from grain.experimental import FirstFitPackIterDataset

    return FirstFitPackIterDataset(ds, length_struct={"input_ids": seq_len, "scored": seq_len},
                                   num_packing_bins=bins, shuffle_bins=False)


class Finalize:
    """Grain's packed batch -> the batch contract above (targets, pad ids, fixed key names)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: dict) -> dict:
        ids = np.asarray(batch["input_ids"], np.int32)
        seg = np.asarray(batch["input_ids_segment_ids"], np.int32)
        pos = np.asarray(batch["input_ids_positions"], np.int32)
        scored = np.asarray(batch["scored"], bool) if "scored" in batch else None
        return make_batch(ids, seg, pos, self.pad_id, scored)


def make_batch(ids: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray, pad_id: int = 0,
               scored: np.ndarray | None = None) -> dict:
    """The contract's four arrays from packed ids and segment ids (positions as given). ``scored`` (chat):
    a token is a target only where it is scored, so the loss mask is ``targets != IGNORE``."""
    targets = np.full(ids.shape, IGNORE, np.int32)
    same_piece = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    if scored is not None:
        same_piece &= scored[:, 1:]
    targets[:, :-1] = np.where(same_piece, ids[:, 1:], IGNORE)
    return {
        "input_ids": np.where(segment_ids > 0, ids, pad_id).astype(np.int32),
        "targets": targets,
        "segment_ids": segment_ids.astype(np.int32),
        "positions": np.where(segment_ids > 0, positions, 0).astype(np.int32),
    }


def packing_stats(batch: dict) -> dict:
    """Token counts of a batch: all, non-padding, with a target; efficiency = non-padding / all."""
    total = int(batch["segment_ids"].size)
    real = int(np.count_nonzero(batch["segment_ids"]))
    return {"tokens": total, "real": real, "loss": int(np.count_nonzero(batch["targets"] != IGNORE)),
            "efficiency": real / total if total else 0.0}

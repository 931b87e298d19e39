"""Random-access document sources: JSONL, Parquet, ArrayRecord text, pre-tokenized ArrayRecord, stdlib, and
the embedded chat corpus.

A source is a Grain data source (``len`` and ``[i]``), so the pipeline can shard it by process and shuffle it
globally by index. ``source[i]`` returns ``(where, payload)``, where ``where`` names the file and the line,
row or record, and the payload is ``str`` (text), an int32 array (token ids) or a list (a conversation's
messages, format chat); a record that cannot be read comes back as :class:`~glm5_jax.data.errors.Bad` rather
than raising inside a Grain thread or worker, and a record that is no document (stdlib) as None.
Sources pickle without their open files, so worker processes reopen them.
"""

from __future__ import annotations

import bisect
import collections
import glob
import json
import logging
import os
import threading

import numpy as np

from glm5_jax.errors import DataError

from .chat_corpus import stdlib_conversations
from .corpus import stdlib_files
from .errors import Bad, ErrorPolicy

log = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


def expand_paths(name: str, patterns: list[str], policy: ErrorPolicy) -> list[str]:
    """Files matching the patterns, sorted per pattern, each file once. A missing file is a bad record (skipped
    or raised); a glob that matches no file and a directory are mistakes in the config: a DataError."""
    files: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(os.path.expandvars(pattern))
        is_glob = bool(_GLOB_CHARS & set(expanded))
        matches = sorted(glob.glob(expanded, recursive=True)) if is_glob else (
            [expanded] if os.path.isfile(expanded) else [])
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            hint = " (an environment variable in it is not set)" if "$" in expanded else ""
            if is_glob or os.path.isdir(expanded):
                what = ("pattern matches no files" if is_glob else
                        "is a directory, not a data file (use a glob such as DIR/*.jsonl)")
                raise DataError(f"source {name}: {expanded}: {what}{hint}")
            policy.handle(name, Bad(expanded, "no such file" + hint))
        files.extend(m for m in matches if m not in files)
    return files


class _Files:
    """Lazily opened per-process file handles, shared by Grain's read threads, dropped when pickled."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self._handles: dict[int, object] = {}
        self._lock = threading.Lock()

    def get(self, i: int, opener):
        handle = self._handles.get(i)
        if handle is None:
            with self._lock:
                handle = self._handles.get(i)
                if handle is None:
                    handle = self._handles[i] = opener(self.paths[i])
        return handle

    def __getstate__(self):
        return {"paths": self.paths}

    def __setstate__(self, state):
        self.__init__(state["paths"])


class Source:
    """Base: ``kind``, ``name``, ``len()``, ``[i] -> (where, payload) | Bad``."""

    kind = ""

    def __init__(self, name: str):
        self.name = name

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int):
        raise NotImplementedError

    def _locate(self, starts: np.ndarray, index: int) -> tuple[int, int]:
        """(file number, record number inside that file) of a global index, given cumulative starts."""
        f = int(np.searchsorted(starts, index, side="right")) - 1
        return f, index - int(starts[f])


def _decode(where: str, data: bytes):
    try:
        return where, data.decode("utf-8")
    except UnicodeDecodeError as e:
        return Bad(where, f"invalid UTF-8 at byte {e.start}")


class StdlibSource(Source):
    """One document per standard-library ``.py`` file (see :mod:`glm5_jax.data.corpus`).

    The few files that are not UTF-8 (the test suite's files in legacy encodings, such as
    ``module_koi8_r.py``) stay in the list, since the shuffle (so the batches) depends on its length, but read
    as no document (None): skipped without a warning, as they are part of the corpus, not bad input.
    """

    kind = "stdlib"

    def __init__(self, name: str, files: list[str] | None = None):
        super().__init__(name)
        self.files = stdlib_files() if files is None else files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return Bad(path, f"cannot read ({e.strerror})")
        record = _decode(path, data)
        return None if isinstance(record, Bad) else record


class JsonlSource(Source):
    """One JSON object per line; the document is ``obj[text_field]``. Blank lines are no records.

    Opening a file scans it once for line starts (one NumPy pass) so records can be read in any
    order with one ``pread`` each; for corpora of many billions of lines prefer ArrayRecord.
    """

    kind = "jsonl"

    def __init__(self, name: str, paths: list[str], text_field: str, policy: ErrorPolicy, chat: bool = False):
        super().__init__(name)
        self.text_field, self.chat = text_field, chat
        self._files = _Files(paths)
        file_ids, starts, lengths, lines = [], [], [], []
        for i, path in enumerate(paths):
            try:
                s, n, ln = _line_spans(path)
            except OSError as e:
                policy.handle(name, Bad(path, f"cannot read ({e.strerror})"))
                continue
            file_ids.append(np.full(len(s), i, np.int32))
            starts.append(s)
            lengths.append(n)
            lines.append(ln)
        cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)
        self._file_ids, self._starts = cat(file_ids, np.int32), cat(starts, np.int64)
        self._lengths, self._lines = cat(lengths, np.int64), cat(lines, np.int64)

    def __len__(self):
        return len(self._starts)

    def __getitem__(self, index):
        f = int(self._file_ids[index])
        path = self._files.paths[f]
        where = f"{path}:{int(self._lines[index])}"
        try:
            fd = self._files.get(f, lambda p: os.open(p, os.O_RDONLY))
            data = os.pread(fd, int(self._lengths[index]), int(self._starts[index]))
        except OSError as e:
            return Bad(where, f"cannot read ({e.strerror})")
        try:
            obj = json.loads(data)
        except UnicodeDecodeError as e:
            return Bad(where, f"invalid UTF-8 at byte {e.start}")
        except json.JSONDecodeError as e:
            return Bad(where, f"not valid JSON ({e.msg} at column {e.colno})")
        value = obj.get(self.text_field) if isinstance(obj, dict) else None
        return _field(where, value, self.text_field, self.chat)


def _field(where: str, value, field: str, chat: bool):
    """(where, value) if the record's field holds a document (or, chat, a list of messages), else Bad."""
    if chat:
        return (where, value) if isinstance(value, list) else Bad(where, f"no list of messages in field {field!r}")
    return (where, value) if isinstance(value, str) else Bad(where, f"no string field {field!r}")


def _line_spans(path: str, chunk: int = 1 << 26):
    """(starts, lengths, 1-based line numbers) of the non-empty lines of a file, without their newline."""
    newlines, size = [], 0
    with open(path, "rb", buffering=0) as f:
        while data := f.read(chunk):
            newlines.append(np.flatnonzero(np.frombuffer(data, np.uint8) == 10) + size)
            size += len(data)
    ends = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    if size and (not len(ends) or ends[-1] != size - 1):
        ends = np.append(ends, size)  # a last line with no newline
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else np.zeros(0, np.int64)
    lengths = ends - starts
    keep = lengths > 0
    return starts[keep], lengths[keep], np.arange(1, len(ends) + 1)[keep]


class ParquetSource(Source):
    """Rows of Parquet files; the document is column ``text_field``.

    A read decodes the row's whole row group, so a small per-process cache of decoded row groups keeps a
    shuffled read from decoding the same group again and again (shuffling makes hits rare on large files:
    prefer ArrayRecord for large shuffled corpora).
    """

    kind = "parquet"
    _cache_size = 8

    def __init__(self, name: str, paths: list[str], text_field: str, policy: ErrorPolicy, chat: bool = False):
        super().__init__(name)
        import pyarrow.parquet as pq

        self.text_field, self.chat = text_field, chat
        kept, groups = [], []  # groups: (file number, row group, first global row, first row in file)
        total = 0
        for path in paths:
            try:
                file = pq.ParquetFile(path)
                meta, columns = file.metadata, file.schema_arrow.names  # top-level columns (a list is one)
            except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError subclasses for corrupt files
                policy.handle(name, Bad(path, f"not a readable Parquet file ({str(e).splitlines()[0][:200]})"))
                continue
            if text_field not in columns:
                policy.handle(name, Bad(path, f"no column {text_field!r}; columns: {', '.join(columns)}"))
                continue
            in_file = 0
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                if rows:
                    groups.append((len(kept), g, total, in_file))
                    total, in_file = total + rows, in_file + rows
            kept.append(path)
        self._files = _Files(kept)
        self._groups = groups
        self._group_starts = [g[2] for g in groups]
        self._len = total
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cache, self._lock = collections.OrderedDict(), threading.Lock()

    def __len__(self):
        return self._len

    def _column(self, k: int):
        with self._lock:
            if k in self._cache:
                self._cache.move_to_end(k)
                return self._cache[k]
        import pyarrow.parquet as pq

        f, g, _, _ = self._groups[k]
        table = pq.ParquetFile(self._files.paths[f]).read_row_group(g, columns=[self.text_field])
        column = table.column(0).to_pylist()
        with self._lock:
            self._cache[k] = column
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return column

    def __getitem__(self, index):
        k = bisect.bisect_right(self._group_starts, index) - 1
        f, g, first, in_file = self._groups[k]
        where = f"{self._files.paths[f]}: row {in_file + index - first}"
        try:
            value = self._column(k)[index - first]
        except Exception as e:  # noqa: BLE001 - a corrupt row group surfaces only when read
            return Bad(where, f"cannot read row group {g} ({str(e).splitlines()[0][:200]})")
        if self.chat:
            return _field(where, value, self.text_field, True)
        if isinstance(value, bytes):
            return _decode(where, value)
        if not isinstance(value, str):
            return Bad(where, f"column {self.text_field!r} holds {type(value).__name__}, not text")
        return where, value


class _ArrayRecordFiles(Source):
    """Records of ArrayRecord files, addressed by a global index."""

    def __init__(self, name: str, paths: list[str], policy: ErrorPolicy):
        super().__init__(name)
        from array_record.python.array_record_module import ArrayRecordReader

        kept, counts = [], []
        for path in paths:
            try:
                reader = ArrayRecordReader(path, "readahead_buffer_size:0")
                counts.append(reader.num_records())
                reader.close()
            except Exception as e:  # noqa: BLE001 - the C++ reader raises RuntimeError / ValueError with a long status text
                policy.handle(name, Bad(path, f"not a readable ArrayRecord file ({str(e).splitlines()[0][:200]})"))
                continue
            kept.append(path)
        self._files = _Files(kept)
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)

    def __len__(self):
        return int(self._starts[-1])

    def _read(self, index):
        from array_record.python.array_record_module import ArrayRecordReader

        f, j = self._locate(self._starts, index)
        where = f"{self._files.paths[f]}: record {j}"
        try:
            reader = self._files.get(f, lambda p: ArrayRecordReader(p, "readahead_buffer_size:0"))
            return where, reader.read([j])[0]
        except Exception as e:  # noqa: BLE001 - reported as a bad record, never a dead worker
            return Bad(where, f"cannot read ({str(e).splitlines()[0][:200]})")


class ArrayRecordTextSource(_ArrayRecordFiles):
    """ArrayRecord files whose records are UTF-8 documents."""

    kind = "arrayrecord"

    def __getitem__(self, index):
        out = self._read(index)
        return out if isinstance(out, Bad) else _decode(*out)


class TokenSource(_ArrayRecordFiles):
    """Pre-tokenized ArrayRecord files: each record is one document as little-endian int32 token ids."""

    kind = "tokens"

    def __getitem__(self, index):
        out = self._read(index)
        if isinstance(out, Bad):
            return out
        where, data = out
        if len(data) % 4:
            return Bad(where, f"{len(data)} bytes is not a whole number of int32 token ids")
        return where, np.frombuffer(data, "<i4").astype(np.int32)


class StdlibChatSource(Source):
    """The embedded SFT corpus: conversations about the standard library's functions (data/chat_corpus.py)."""

    kind = "stdlib_chat"

    def __init__(self, name: str):
        super().__init__(name)
        self.records = stdlib_conversations()

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return f"stdlib_chat: record {index}", self.records[index]


def open_source(cfg, policy: ErrorPolicy) -> Source:
    """The source a :class:`~glm5_jax.data.config.SourceConfig` describes; raises DataError if it is empty."""
    if cfg.kind == "stdlib":
        source = StdlibSource(cfg.name)
    elif cfg.kind == "stdlib_chat":
        source = StdlibChatSource(cfg.name)
    else:
        paths = expand_paths(cfg.name, cfg.paths, policy)
        chat = cfg.format == "chat"
        if cfg.kind == "jsonl":
            source = JsonlSource(cfg.name, paths, cfg.text_field, policy, chat)
        elif cfg.kind == "parquet":
            source = ParquetSource(cfg.name, paths, cfg.text_field, policy, chat)
        elif cfg.kind == "arrayrecord":
            source = ArrayRecordTextSource(cfg.name, paths, policy)
        else:
            source = TokenSource(cfg.name, paths, policy)
    if len(source) == 0:
        raise DataError(f"source {cfg.name}: no records in {', '.join(cfg.paths) or 'the standard library'}")
    log.info("source %s (%s): %d records", cfg.name, cfg.kind, len(source))
    return source

"""Conversion between Hugging Face safetensors directories and this stack's Orbax checkpoints.

Both directions stream: one HF tensor is read, transformed and written before the next, so peak memory
is about one tensor whatever the model size. Everything that can be checked before writing (config,
names, shapes) is checked first, and output appears atomically under its final name only when complete.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections import defaultdict

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from glm5_jax import config as config_lib
from glm5_jax.checkpoint.outputs import atomic_output_dir
from glm5_jax.checkpoint.store import CHUNK_BYTES, CheckpointReader, abstract_leaves, describe_read_error, write_streaming
from glm5_jax.convert.int4 import Int4Experts, quantization_config
from glm5_jax.convert.names import Entry, hf_entries
from glm5_jax.errors import CheckpointError, ConversionError
from glm5_jax.memory import check_fits
from glm5_jax.progress import progress_bar
from glm5_jax.values import apply_overrides, read_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
_ST_DTYPE = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16",
             np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}
_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
# Tensors that transformers keeps in float32 whatever the checkpoint dtype.
FLOAT32_TENSORS = re.compile(r".*(\.mlp\.gate\.e_score_correction_bias|\.indexer\.weights_proj\.weight)$")



# ----------------------------------------------------------------------------------------------- reading
class HFDirectory:
    """A transformers checkpoint directory: config.json plus single or sharded safetensors."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise ConversionError(f"{self.path}: no such directory")
        index = os.path.join(self.path, INDEX_FILE)
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f).get("weight_map")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConversionError(f"{index}: not valid JSON ({e})") from None
            except AttributeError:
                weight_map = None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConversionError(f"{index}: needs a \"weight_map\" of tensor names to safetensors files")
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(self.path, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise ConversionError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        self.file_of: dict[str, str] = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        self.dtype_of: dict[str, str] = {}  # safetensors dtype names: F32, BF16, I64, ...
        for name in files:
            try:
                with safe_open(os.path.join(self.path, name), framework="np") as f:
                    for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                        self.file_of[key] = name
                        self.shape_of[key] = tuple(f.get_slice(key).get_shape())
                        self.dtype_of[key] = f.get_slice(key).get_dtype()
            except Exception as e:  # safetensors raises several types for missing or corrupt files
                raise ConversionError(f"{os.path.join(self.path, name)}: unreadable safetensors file ({e})") from None
        self._open: tuple[str, object] | None = None  # one file open at a time keeps mapped pages few
        self.config = self._load_config()

    def _load_config(self):
        path = os.path.join(self.path, "config.json")
        values = config_lib.hf_to_dict(read_json(path))
        if "num_nextn_predict_layers" not in values:
            # transformers does not record it: an MTP layer is present iff its tensors are.
            n = values.get("num_hidden_layers", config_lib.ModelConfig.num_hidden_layers)
            values["num_nextn_predict_layers"] = int(f"model.layers.{n}.eh_proj.weight" in self.file_of)
        return config_lib.from_dict(values)

    def read(self, name: str) -> np.ndarray:
        file = self.file_of[name]
        if self._open is None or self._open[0] != file:
            self._open = (file, safe_open(os.path.join(self.path, file), framework="np"))
        return self._open[1].get_tensor(name)


def _checked_entries(cfg, shapes: dict[str, tuple], dtypes: dict[str, str], leaves) -> list[Entry]:
    """Entries for cfg, after checking the HF tensors match them exactly (names, shapes, floating dtypes)."""
    entries = hf_entries(cfg)
    expected = {e.hf for e in entries}
    unexpected = sorted(set(shapes) - expected)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(f"unexpected tensor {unexpected[0]}{more}: not part of a GLM-5 model with this config")
    for e in entries:
        if e.hf not in shapes:
            raise ConversionError(f"missing tensor {e.hf}")
        slot_shape = leaves[e.path].shape[len(e.index):]
        want = e.hf_shape(slot_shape)
        if tuple(shapes[e.hf]) != want:
            raise ConversionError(f"tensor {e.hf} has shape {list(shapes[e.hf])}, but config.json implies "
                                  f"{list(want)}")
        if dtypes[e.hf] not in _FLOAT_DTYPES:
            raise ConversionError(f"tensor {e.hf} has dtype {dtypes[e.hf]}; a parameter must be floating point "
                                  f"({', '.join(_FLOAT_DTYPES)})")
    return entries


def hf_to_orbax(hf_dir: str, out: str, *, overrides=(), overwrite: bool = False, show_progress: bool = True):
    """Convert a transformers GLM-5 directory into an Orbax checkpoint (step 0) at `out`.

    `overrides` (key=value) set this stack's own config fields (param_dtype, dtype, mtp_depths, ...),
    which config.json does not carry; they are stored with the checkpoint.
    """
    hf = HFDirectory(hf_dir)
    cfg = config_lib.from_dict(apply_overrides(hf.config.to_dict(), overrides))
    leaves = abstract_leaves(cfg)
    entries = _checked_entries(cfg, hf.shape_of, hf.dtype_of, leaves)
    by_leaf: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        by_leaf[e.path].append(e)
    missing = sorted(set(leaves) - set(by_leaf))
    if missing:  # a variable of ours that no HF tensor fills would be left uninitialised
        raise ConversionError(f"no HF tensor maps to parameter {missing[0]}")
    _check_largest_slot(entries, leaves)
    index_dims = {name: len(es[0].index) for name, es in by_leaf.items()}
    # Leaves in the order of their first tensor's file, so reads mostly move forward through the files.
    order = sorted(by_leaf, key=lambda n: min((hf.file_of[e.hf], e.hf) for e in by_leaf[n]))

    def fill(name, write):
        for e in by_leaf[name]:
            slot_shape = leaves[name].shape[len(e.index):]
            write(e.index, e.to_slot(hf.read(e.hf), slot_shape))

    with atomic_output_dir(out, overwrite) as tmp, progress_bar("hf -> orbax", len(order), show_progress) as advance:
        write_streaming(tmp, cfg, {n: leaves[n] for n in order}, index_dims, fill, progress=advance)
    return cfg


def _check_largest_slot(entries: list[Entry], leaves: dict):
    """Conversion holds one tensor (one slot of a stacked array) at a time, in float32: the largest must fit."""
    largest = max(math.prod(leaves[e.path].shape[len(e.index):]) for e in entries)
    check_fits("convert: its largest tensor (in float32)", [jax.ShapeDtypeStruct((largest,), np.float32)])


# ----------------------------------------------------------------------------------------------- writing
def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1024' -> bytes (decimal units, as transformers uses)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConversionError(f"--max-shard-size: cannot read {text!r}; use e.g. 5GB or 500MB")
    unit = m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30,
             "TI": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise ConversionError(f"--max-shard-size: must be at least 1 byte (e.g. 5GB, 500MB); got {text!r}")
    return size


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor: the header is laid out first from shapes and dtypes."""

    def __init__(self, path: str, tensors: list[tuple[str, tuple, np.dtype]], metadata: dict):
        header, offset = {"__metadata__": metadata}, 0
        for name, shape, dtype in tensors:
            size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": _ST_DTYPE[np.dtype(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._expected = [(name, tuple(shape), np.dtype(dtype)) for name, shape, dtype in tensors]
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, array: np.ndarray):
        want = self._expected.pop(0)
        if (name, array.shape, array.dtype) != want:
            raise AssertionError(f"writing {name} {array.shape} {array.dtype}; header says {want}")
        self._file.write(np.ascontiguousarray(array).tobytes())

    def close(self):
        if self._expected:
            raise AssertionError(f"{len(self._expected)} tensors never written")
        self._file.close()


class _Blocks:
    """Slots of stored arrays, read a stored chunk at a time: a stack saved by training (Orbax's chunks, one per
    device shard) holds many slots in a chunk, and reading it slot by slot decompresses the chunk once per slot
    (32 times, for a layer's experts on one of 8 expert shards). Chunk-aligned blocks along the slot dimensions
    are kept, least recently used dropped first, up to `limit` bytes in all; a larger block is read slot by slot
    (there, a chunk-wise save would be the remedy)."""

    def __init__(self, limit: int = 2 * CHUNK_BYTES):
        self.limit, self._kept = limit, {}

    def slot(self, path: str, array, index: tuple):
        if not index:
            return array.read().result()
        chunk = [max(c, 1) for c in (array.chunk_layout.read_chunk.shape or array.shape)]
        start = tuple(i // c * c for i, c in zip(index, chunk))
        stop = tuple(min(a + c, n) for a, c, n in zip(start, chunk, array.shape))
        slots = math.prod(b - a for a, b in zip(start, stop))
        nbytes = slots * math.prod(array.shape[len(index):]) * array.dtype.numpy_dtype.itemsize
        if slots == 1 or nbytes > self.limit:  # (a chunk per slot: what glm5 init and hf-to-orbax write)
            return array[index].read().result()
        key = (path, start)
        if key not in self._kept:
            while self._kept and sum(b.nbytes for b in self._kept.values()) + nbytes > self.limit:
                self._kept.pop(next(iter(self._kept)))  # the least recently used
            self._kept[key] = array[tuple(slice(a, b) for a, b in zip(start, stop))].read().result()
        self._kept[key] = block = self._kept.pop(key)  # now the most recently used
        return block[tuple(i - a for i, a in zip(index, start))]


def orbax_to_hf(checkpoint: str, out: str, *, step: int | None = None, dtype: str = "bfloat16",
                max_shard_size: str | int = "5GB", quantize: str | None = None, overwrite: bool = False,
                show_progress: bool = True):
    """Export a checkpoint step as a transformers GLM-5 directory (safetensors + index + config.json).

    quantize="int4" writes the routed experts as compressed-tensors INT4 (glm5_jax/convert/int4.py), for a
    checkpoint trained with qat=int4, whose forward it reproduces.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype: must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if quantize not in (None, "int4"):
        raise ConversionError(f"--quantize: must be int4; got {quantize!r}")
    limit = parse_size(str(max_shard_size))
    reader = CheckpointReader(checkpoint, step)
    cfg = reader.config
    if quantize and cfg.qat != quantize:
        raise ConversionError(f"--quantize {quantize}: {checkpoint} step {reader.step} was trained with qat: {cfg.qat}, "
                              f"so its forward uses float expert weights; train (or fine-tune) with qat={quantize}")
    int4 = Int4Experts(cfg) if quantize else None
    leaves = abstract_leaves(cfg)
    absent = sorted(set(leaves) - set(reader.names))
    if absent:
        raise CheckpointError(f"{checkpoint} step {reader.step}: parameter {absent[0]} is missing")
    entries = hf_entries(cfg)
    _check_largest_slot(entries, leaves)

    def outputs(e: Entry, shape: tuple) -> list[tuple[str, tuple, np.dtype]]:
        if int4 and int4.covers(e.hf):
            return int4.layout(e.hf, shape)
        return [(e.hf, shape, np.dtype(np.float32 if FLOAT32_TENSORS.match(e.hf) else DTYPES[dtype]))]

    shards: list[list[tuple[Entry, list]]] = [[]]
    used = total = 0
    for e in entries:
        outs = outputs(e, e.hf_shape(leaves[e.path].shape[len(e.index):]))
        size = sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize for _, shape, dt in outs)
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append((e, outs))
        used += size
        total += size
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    arrays: dict[str, object] = {}  # open TensorStore handles (metadata only)
    blocks = _Blocks()

    with atomic_output_dir(out, overwrite) as tmp, progress_bar("orbax -> hf", len(entries), show_progress) as advance:
        for file, shard in zip(names, shards):
            writer = SafetensorsWriter(os.path.join(tmp, file), [o for _, outs in shard for o in outs],
                                       {"format": "pt"})
            for e, outs in shard:
                if e.path not in arrays:
                    arrays[e.path] = reader.open(e.path)
                    if tuple(arrays[e.path].shape) != leaves[e.path].shape:
                        raise CheckpointError(f"{checkpoint} step {reader.step}: array {e.path} has shape "
                                              f"{list(arrays[e.path].shape)}; its config implies "
                                              f"{list(leaves[e.path].shape)}")
                try:
                    slot = blocks.slot(e.path, arrays[e.path], e.index)
                except (ValueError, OSError) as exc:  # TensorStore: a truncated or corrupt data file
                    raise CheckpointError(f"{checkpoint} step {reader.step}: cannot read "
                                          f"{describe_read_error(exc, reader.item_dir)}") from None
                weight = e.to_hf(np.asarray(slot))
                tensors = (int4.tensors(e.hf, weight) if int4 and int4.covers(e.hf)
                           else [(e.hf, weight.astype(outs[0][2]))])
                for name, array in tensors:
                    writer.write(name, array)
                advance()
            writer.close()
        if len(shards) > 1:
            weight_map = {name: file for file, shard in zip(names, shards) for _, outs in shard for name, _, _ in outs}
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        config_lib.save_hf_config(cfg, os.path.join(tmp, "config.json"), dtype=dtype,
                                  quantization=quantization_config(cfg.qat_group_size) if int4 else None)
    return cfg

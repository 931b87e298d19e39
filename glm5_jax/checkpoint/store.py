"""Orbax checkpoints of model state, written and read one array (or one slice) at a time.

A checkpoint is an `orbax.checkpoint.CheckpointManager` directory; each step holds two items:
`params` (the model's variables as a nested dict: dotted leaf names such as
`layers.1.mlp.experts_gate`) and `config` (the model config as JSON). Conversion writes `params` through
TensorStore slot by slot, so memory stays bounded by one tensor, never by the model; Orbax reads it like
any other checkpoint, onto any sharding.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx

from glm5_jax import config as config_lib
from glm5_jax.checkpoint.naming import nest
from glm5_jax.dotted import dotted_name
from glm5_jax.errors import CheckpointError
from glm5_jax.memory import check_fits
from glm5_jax.model import GLM5
from glm5_jax.values import apply_overrides

PARAMS, CONFIG = "params", "config"
CHUNK_BYTES = 64 << 20  # on-disk chunk size bound: reads of one device's shard stay small



_STATUS = re.compile(r"\b(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|FAILED_PRECONDITION|INVALID_ARGUMENT|INTERNAL|UNKNOWN|"
                     r"PERMISSION_DENIED|UNAVAILABLE|ABORTED|RESOURCE_EXHAUSTED)\b")
_OCDBT_KEY = re.compile(r'reading "([^"/]+)/[^"]*"')  # 'Error reading "layers.0.mlp.gate/0.0" in OCDBT ...'
_FILE = re.compile(r'local file "([^"]+)"')
_RANGE = re.compile(r"byte range \[(\d+), (\d+)\) is not valid for value of size (\d+)")


def describe_read_error(exc: BaseException, directory: str) -> str:
    """One short line for an Orbax / TensorStore read failure: the array (dotted name), the file, the cause.

    TensorStore's messages are long and Orbax nests them inside reprs; the array and the file are found in
    the text when it names them (an OCDBT key or a zarr chunk path below `directory`).
    """
    text = " ".join(str(exc).split())
    array = None
    m = _OCDBT_KEY.search(text)
    if m:
        array = m.group(1)
    files = _FILE.findall(text)
    file = files[-1] if files else None
    if array is None and file:
        root = os.path.abspath(directory)
        rel = os.path.relpath(os.path.abspath(file), root) if os.path.abspath(file).startswith(root) else ""
        parts = [p for p in rel.split(os.sep) if p and p != ".."]
        names = [p for p in parts if re.fullmatch(r"[A-Za-z_][\w]*(\.\w+)+", p)]
        array = names[0] if names else None
    status = _STATUS.search(text)
    cause = status.group(1) if status else type(exc).__name__
    r = _RANGE.search(text)
    if r:
        cause += f": truncated (needs bytes up to {r.group(2)}, the stored value has {r.group(3)})"
    elif status:
        rest = text[status.end():].lstrip(": ")
        cause += f": {rest[:160]}{'...' if len(rest) > 160 else ''}"
    else:
        cause += f": {text[:160]}{'...' if len(text) > 160 else ''}"
    where = f"array {array}" if array else "an array"
    return f"{where} in {file or directory}: {cause}"


def abstract_leaves(cfg) -> dict[str, jax.ShapeDtypeStruct]:
    """Dotted name -> shape and dtype of every model variable, without allocating any of them."""
    model = nnx.eval_shape(lambda: GLM5(cfg, rngs=nnx.Rngs(0)))
    return {name: jax.ShapeDtypeStruct(v.shape, v.dtype) for name, v in named_variables(model).items()}


def named_variables(model) -> dict[str, nnx.Variable]:
    """Every variable of a model by dotted name (`layers.1.mlp.experts_gate`), the checkpoint's leaf names."""
    return {dotted_name(path): var for path, var in nnx.to_flat_state(nnx.state(model))}


def _chunks(shape, index_dims: int, itemsize: int) -> list[int]:
    """Chunk shape: one slot per chunk (leading indexed dims 1), first free dim split to <= CHUNK_BYTES."""
    chunks = [1] * index_dims + list(shape[index_dims:])
    if len(chunks) > index_dims and chunks[index_dims]:
        row = math.prod(chunks[index_dims + 1:]) * itemsize
        chunks[index_dims] = max(1, min(chunks[index_dims], CHUNK_BYTES // max(row, 1)))
    return chunks or [1]


def _zarr_spec(path: str, shape, dtype, chunks) -> dict:
    """A new zarr v2 array as Orbax writes them (zstd level 1); zarr names bfloat16 by name."""
    dtype = jnp.dtype(dtype)
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": path},
            "metadata": {"shape": list(shape), "chunks": chunks, "compressor": {"id": "zstd", "level": 1},
                         "dtype": "bfloat16" if dtype == jnp.bfloat16 else dtype.str}}


def write_streaming(out: str, cfg, leaves: dict[str, jax.ShapeDtypeStruct], index_dims: dict[str, int],
                    fill: Callable[[str, Callable[[tuple, np.ndarray], None]], None], *, step: int = 0,
                    progress: Callable[[str], None] = lambda name: None):
    """Write a one-step checkpoint into the (new, empty) directory `out`.

    Orbax writes the tree structure and config; each leaf's array is then created with TensorStore and
    `fill(name, write)` calls `write(index, value)` for every slot, so only one slot is in memory.
    """
    skeleton = {n: jnp.zeros((1,) * len(s.shape), s.dtype) for n, s in leaves.items()}
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False)
    with ocp.CheckpointManager(out, options=ocp.CheckpointManagerOptions(create=True),
                               item_handlers={PARAMS: handler, CONFIG: ocp.JsonCheckpointHandler()}) as mngr:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.PyTreeSave(nest(skeleton)),
                                                 config=ocp.args.JsonSave(cfg.to_dict())))
        mngr.wait_until_finished()
    item_dir = os.path.join(out, str(step), PARAMS)
    # Orbax's per-array write metadata describes the placeholders; the zarr headers below are the truth.
    shutil.rmtree(os.path.join(item_dir, "array_metadatas"), ignore_errors=True)
    for name, leaf in leaves.items():
        chunks = _chunks(leaf.shape, index_dims.get(name, 0), jnp.dtype(leaf.dtype).itemsize)
        array = ts.open(_zarr_spec(os.path.join(item_dir, name), leaf.shape, leaf.dtype, chunks),
                        create=True, delete_existing=True).result()

        def write(index: tuple, value: np.ndarray, array=array, leaf=leaf):
            array[index].write(np.asarray(value, dtype=leaf.dtype)).result()

        fill(name, write)
        progress(name)


def save_model(model: GLM5, cfg, directory: str, step: int = 0):
    """Save a model's variables and config as a new committed step (Orbax's default OCDBT format)."""
    tree = nest({name: v[...] for name, v in named_variables(model).items()})
    with ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=True),
                               item_handlers={PARAMS: ocp.PyTreeCheckpointHandler(),
                                              CONFIG: ocp.JsonCheckpointHandler()}) as mngr:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.PyTreeSave(tree),
                                                 config=ocp.args.JsonSave(cfg.to_dict())))
        mngr.wait_until_finished()


class CheckpointReader:
    """Read a saved step's config and its arrays one at a time (or slice by slice) with no mesh."""

    def __init__(self, directory: str, step: int | None = None):
        directory = os.path.abspath(directory)
        if not os.path.isdir(directory):
            raise CheckpointError(f"{directory}: no such checkpoint directory")
        steps = ocp.utils.checkpoint_steps(directory)
        committed = sorted(s for s in steps if ocp.utils.is_checkpoint_finalized(os.path.join(directory, str(s))))
        if not committed and os.path.isfile(os.path.join(directory, "config.json")):
            raise CheckpointError(f"{directory}: a Hugging Face model directory, not an Orbax checkpoint; convert it "
                                  f"first: glm5 convert hf-to-orbax --hf-dir {directory} --out CKPT, then pass CKPT")
        if not committed:
            raise CheckpointError(f"{directory}: holds no committed checkpoint step")
        if step is None:
            step = committed[-1]
        elif step not in committed:
            raise CheckpointError(f"{directory}: step {step} is not a committed step (have {committed})")
        self.directory, self.step = directory, step
        self.item_dir = os.path.join(directory, str(step), PARAMS)
        try:
            with open(os.path.join(directory, str(step), CONFIG, "metadata")) as f:
                self.config = config_lib.from_dict(json.load(f))
            with open(os.path.join(self.item_dir, "_METADATA")) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{directory} step {step}: unreadable metadata ({e})") from None
        self._ocdbt = meta.get("use_ocdbt", False)
        self._driver = "zarr3" if meta.get("use_zarr3", False) else "zarr"
        self.names = [".".join(k["key"] for k in leaf["key_metadata"]) for leaf in meta["tree_metadata"].values()]

    def open(self, name: str) -> ts.TensorStore:
        if self._ocdbt:
            kvstore = {"driver": "ocdbt", "base": f"file://{self.item_dir}", "path": name}
        else:
            kvstore = {"driver": "file", "path": os.path.join(self.item_dir, name)}
        try:
            return ts.open({"driver": self._driver, "kvstore": kvstore}, open=True, read=True).result()
        except ValueError as e:
            raise CheckpointError(f"{self.item_dir}: array {name!r} unreadable ({e})") from None


def load_model(directory: str, step: int | None = None, overrides=()) -> tuple[GLM5, object]:
    """Restore a checkpoint into a GLM5 model on the default device; returns (model, config).

    `overrides` (key=value) change compute settings such as dtype; shapes must match the checkpoint.
    """
    reader = CheckpointReader(directory, step)
    cfg = reader.config
    if overrides:
        cfg = config_lib.from_dict(apply_overrides(cfg.to_dict(), overrides))
        _check_same_shapes(reader, cfg, overrides)
    model = nnx.eval_shape(lambda: GLM5(cfg, rngs=nnx.Rngs(0)))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = nest({name: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                    for name, v in named_variables(model).items()})
    check_fits(f"{reader.directory} step {reader.step}: the model's parameters", target)
    with ocp.CheckpointManager(reader.directory, item_handlers={PARAMS: ocp.PyTreeCheckpointHandler()}) as mngr:
        restored = mngr.restore(reader.step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))))[PARAMS]
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, _int_keys(restored))
    nnx.update(model, state)
    return model, cfg


def _check_same_shapes(reader: CheckpointReader, cfg, overrides):
    """Overrides of a saved model may change compute settings (dtype, remat, ...), never parameter shapes."""
    saved = {n: v.shape for n, v in abstract_leaves(reader.config).items()}
    wanted = {n: v.shape for n, v in abstract_leaves(cfg).items()}
    if saved == wanted:
        return
    name = next((n for n in wanted if saved.get(n) != wanted[n]), None) or sorted(set(saved) - set(wanted))[0]
    keys = ", ".join(o.split("=", 1)[0] for o in overrides)
    need = f"would be {list(wanted[name])}" if name in wanted else "would not exist"
    found = f"is {list(saved[name])}" if name in saved else "does not exist"
    raise config_lib.ConfigError(f"{keys}: changes the shapes of the model's parameters ({name} {need}; in "
                                 f"{reader.directory} step {reader.step} it {found}); overrides of a checkpoint "
                                 "may change only compute settings such as dtype")


def _int_keys(tree):
    """Orbax keys are strings; nnx.List positions are ints."""
    if not isinstance(tree, dict):
        return tree
    return {int(k) if k.isdigit() else k: _int_keys(v) for k, v in tree.items()}

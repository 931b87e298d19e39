"""The devices a plan compiles for: N simulated CPU devices (`--target cpu`), a TPU slice described by
libtpu's topology (`--target tpu:v5p-512`), compiled by the real TPU compiler on a host without a TPU, or
GPUs compiled for by XLA's GPU compiler without a GPU (`--target gpu:h100-256`, glm5_jax/plan/gpus.py).

TPU product names, by what their number counts (docs/plan.md):

- `v5p-N`: TensorCores, 2 per chip, one JAX device per chip (megacore): v5p-512 is 256 chips, 4x8x8.
- `v5e-N`, `v6e-N`: chips, one TensorCore and one JAX device each: v6e-256 is 16x16.
- any generation libtpu knows as GEN:TOPOLOGY in chips: `tpu:v5p:4x8x8`, `tpu:v6e:16x16`,
  `tpu:tpu7x:2x2x1` (TPU7x: 2 devices per chip).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
import subprocess
import sys

from glm5_jax.errors import ConfigError

CHILD_ENV = "GLM5_PLAN_CHILD"  # set in a re-executed plan process: never re-execute twice
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
GIB = 2**30
# HBM of one JAX device as libtpu 0.0.42's compiler reports it ("exceeds available HBM (95.74G)"), by
# Device.device_kind. The compiler decides what fits; these figures only give the headroom of a plan that fits.
TPU_MEMORY = {"TPU v5": int(95.74 * GIB), "TPU v5 lite": int(15.75 * GIB), "TPU v6 lite": int(31.25 * GIB),
              "TPU7x": int(94.75 * GIB)}
# Product name -> (libtpu generation name, chips per counted unit, topology dimensions)
_PRODUCTS = {"v5p": ("v5p", 0.5, 3), "v5e": ("v5e", 1, 2), "v6e": ("v6e", 1, 2)}
TARGET_FORMS = ("cpu", "tpu:v5p-N (N TensorCores, 2 per chip)", "tpu:v5e-N / tpu:v6e-N (N chips)",
                "tpu:GEN:AxB[xC] (a topology libtpu knows, in chips: v5p:4x8x8, v6e:16x16, tpu7x:2x2x1)",
                "gpu:h100-N / gpu:h200-N (N GPUs: up to 8 on one host, else whole hosts of 8)")
TPU_ENV = {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def parse_bytes(text: str, key: str) -> int:
    """`80GB` -> 80e9, `80GiB` -> 80 * 2**30, `512MB`, `1.5TB`, a bare number of bytes; `key` (the flag) names
    it in errors."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{key}: expected a size such as 80GB, 80GiB or 512MB; got {text!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


@dataclasses.dataclass(frozen=True)
class Target:
    """What the plan compiles for. `topology`: libtpu's name (`v5p:4x8x8`), a GPU kind and count (`h100:256`),
    None for CPU."""

    name: str
    platform: str  # "cpu" | "tpu" | "gpu"
    topology: str | None = None

    @property
    def is_tpu(self) -> bool:
        return self.platform == "tpu"

    @property
    def gpu(self) -> tuple[str, int]:
        """(GPU kind, count) of a `gpu:KIND-N` target."""
        kind, count = self.topology.split(":")
        return kind, int(count)

    @property
    def compile_only(self) -> bool:
        """A TPU or GPU target: devices described to their compiler, none present."""
        return self.platform != "cpu"


def _bad_target(text: str, why: str = "") -> ConfigError:
    return ConfigError(f"--target: {why}{'; ' if why else ''}expected one of {', '.join(TARGET_FORMS)}; got {text!r}")


def product_topology(product: str, count: int) -> str:
    """`v5p`, 512 -> `v5p:4x8x8`: the slice's chips as the usual topology (the last smallest side doubled
    until the chips are there: v5p 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...; v5e/v6e 1x1, 1x2, 2x2, 2x4, ...)."""
    gen, per_unit, ndim = _PRODUCTS[product]
    chips = count * per_unit
    smallest = 4 if ndim == 3 else 1
    if chips < smallest or chips != int(chips) or int(chips) & (int(chips) - 1):
        unit = "TensorCores (2 per chip), at least 8" if per_unit < 1 else "chips, a power of two"
        raise _bad_target(f"{product}-{count}", f"{product}-N counts {unit}")
    dims = [2, 2, 1] if ndim == 3 else [1, 1]
    while math.prod(dims) < chips:
        low = min(dims)
        i = len(dims) - 1 - dims[::-1].index(low)
        dims[i] *= 2
    return f"{gen}:{'x'.join(map(str, dims))}"


def parse_target(text: str) -> Target:
    """`cpu`, `tpu:v5p-512`, `tpu:v6e-256`, `tpu:v5p:4x8x8`, `tpu:tpu7x:2x2x1` -> Target (no devices yet)."""
    text = str(text).strip()
    if text == "cpu":
        return Target("cpu", "cpu")
    m = re.fullmatch(r"tpu:([a-z0-9]+)-(\d+)", text)
    if m:
        if m.group(1) not in _PRODUCTS:
            raise _bad_target(text, f"unknown TPU product {m.group(1)!r} (products: {', '.join(_PRODUCTS)})")
        return Target(text, "tpu", product_topology(m.group(1), int(m.group(2))))
    m = re.fullmatch(r"tpu:([a-z0-9]+):(\d+(?:x\d+){1,2})", text)
    if m:
        return Target(text, "tpu", f"{m.group(1)}:{m.group(2)}")
    m = re.fullmatch(r"gpu:([a-z0-9]+)-(\d+)", text)
    if m:
        from glm5_jax.plan.gpus import GPUS, PER_HOST

        kind, count = m.group(1), int(m.group(2))
        if kind not in GPUS:
            raise _bad_target(text, f"unknown GPU {kind!r} (GPUs: {', '.join(GPUS)})")
        if count < 1 or (count > PER_HOST and count % PER_HOST):
            raise _bad_target(text, f"gpu:{kind}-N counts GPUs: 1 to {PER_HOST} on one host, else a multiple of "
                              f"{PER_HOST}")
        return Target(text, "gpu", f"{kind}:{count}")
    raise _bad_target(text)


def versions() -> str:
    """`jax 0.10.2, libtpu 0.0.42.1`: printed with every TPU verdict (the compiler is libtpu's)."""
    import jax

    try:
        libtpu = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        libtpu = "not installed"
    return f"jax {jax.__version__}, libtpu {libtpu}"


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def tpu_devices(target: Target) -> list:
    """The devices of `target`'s topology, for compiling only (libtpu's compiler, no TPU needed)."""
    if not libtpu_installed():
        raise ConfigError(f"--target {target.name}: needs libtpu, the TPU compiler: pip install -e '.[tpu]' "
                          f"(docs/plan.md); {versions()}")
    for key, value in TPU_ENV.items():
        os.environ.setdefault(key, value)
    import jax
    from jax.experimental import topologies

    host_backend_cpu()

    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=target.topology)
    except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:
        raise ConfigError(f"--target {target.name}: libtpu does not know topology {target.topology!r} "
                          f"({str(e).splitlines()[0][:160]}); {versions()}") from None
    return list(topology.devices)


def host_backend_cpu():
    """Keep this process's own backend on CPU before JAX starts: a compile-only target opens no device."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


def compile_devices(target: Target) -> list:
    """The compile-only devices of a TPU or GPU target."""
    if target.is_tpu:
        return tpu_devices(target)
    from glm5_jax.plan.gpus import gpu_devices

    return gpu_devices(*target.gpu)


def device_memory(devices, target: Target, given: str | None) -> int | None:
    """Bytes of one device: `--device-memory` on CPU (default 80GB) and GPUs (default the GPU's nominal
    capacity); the TPU kind's HBM (`TPU_MEMORY`)."""
    if target.platform == "gpu":
        from glm5_jax.plan.gpus import GPUS

        default = GPUS[target.gpu[0]].memory
        return default if given is None else parse_bytes(given, "--device-memory")
    if not target.is_tpu:
        return parse_bytes("80GB" if given is None else given, "--device-memory")
    if given is not None:
        raise ConfigError("--device-memory: only for --target cpu and gpu:... (on a TPU target the compiler knows "
                          "the HBM)")
    return TPU_MEMORY.get(devices[0].device_kind)


# ----------------------------------------------------------------------------------------------------
# Simulated CPU devices
# ----------------------------------------------------------------------------------------------------

def _forced_device_count() -> int | None:
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(m.group(1)) if m else None


def cpu_devices_ready(n: int) -> bool:
    """Arrange `n` simulated CPU devices in this process if JAX allows it; False if a fresh process is needed.

    Before JAX's backends start, `jax_num_cpu_devices` (and `jax_platforms=cpu`) can still be set; after,
    the device count is fixed, and an already-initialised process with fewer CPU devices must re-execute.
    An `XLA_FLAGS` device count already present (e.g. a test session's 8) is respected, never lowered.
    """
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        forced = _forced_device_count()
        if forced is None or forced < n:
            if forced is not None:  # the flag would contradict the count we set; let the child set it
                return False
            jax.config.update("jax_num_cpu_devices", n)
        jax.config.update("jax_platforms", "cpu")
    return len(jax.devices("cpu")) >= n


def reexec_with_devices(n: int, argv: list[str]) -> int:
    """Run `glm5 <argv>` again in a child process that starts JAX with `n` CPU devices; its exit status."""
    if os.environ.get(CHILD_ENV):
        raise ConfigError(f"--devices: could not create {n} simulated CPU devices")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = {**os.environ, CHILD_ENV: "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n}".strip()}
    sys.stdout.flush()
    return subprocess.run([sys.executable, "-m", "glm5_jax.cli", *argv], env=env, check=False).returncode

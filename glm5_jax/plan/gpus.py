"""GPU targets of `glm5 plan`: XLA's GPU compiler run without a GPU (`--target gpu:h100-256`).

jax's CUDA PJRT plugin compiles for devices that need not exist: given a GPU target description (XLA's
`GpuTargetConfigProto`: the device's compute capability, cores, shared memory, registers, memory) and a
topology of slices x hosts x GPUs, it returns compile-only devices, and a program compiled for them reports
its buffers as on the real GPUs. No CUDA driver is needed. The descriptions below are the public figures
of each GPU (SXM parts); `device_memory_size` is the nominal capacity (80 GB, 141 GB), the figure a plan's
verdict compares the peak with.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util

from glm5_jax.errors import ConfigError

PER_HOST = 8  # GPUs a host (an HGX board)


@dataclasses.dataclass(frozen=True)
class Gpu:
    description: str  # the compile-only devices' device_kind
    memory: int  # bytes: nominal capacity
    bandwidth: int  # bytes / s of HBM
    compute_capability: tuple[int, int] = (9, 0)
    cores: int = 132  # streaming multiprocessors
    clock_ghz: float = 1.98
    l2_cache: int = 50 * 2**20
    shared_per_core: int = 228 * 2**10
    shared_per_block_optin: int = 227 * 2**10


GPUS = {"h100": Gpu("NVIDIA H100 80GB HBM3", 80 * 10**9, 3_350 * 10**9),
        "h200": Gpu("NVIDIA H200", 141 * 10**9, 4_800 * 10**9)}


def target_config(gpu: Gpu) -> str:
    """The GpuTargetConfigProto of `gpu`, in text form."""
    major, minor = gpu.compute_capability
    info = {"threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 48 * 2**10,
            "shared_memory_per_core": gpu.shared_per_core, "threads_per_core_limit": 2048,
            "core_count": gpu.cores, "fpus_per_core": 128, "block_dim_limit_x": 2**31 - 1,
            "block_dim_limit_y": 65535, "block_dim_limit_z": 65535, "memory_bandwidth": gpu.bandwidth,
            "l2_cache_size": gpu.l2_cache, "clock_rate_ghz": gpu.clock_ghz, "device_memory_size": gpu.memory,
            "shared_memory_per_block_optin": gpu.shared_per_block_optin,
            "registers_per_core_limit": 65536, "registers_per_block_limit": 65536}
    fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
    return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
            'platform_name: "CUDA"\ndnn_version_info { major: 9 minor: 8 patch: 0 }\n'
            f'device_description_str: "{gpu.description}"\n')


def topology(count: int) -> str:
    """slices x hosts x GPUs of `count` GPUs: whole hosts of PER_HOST, or one host with fewer."""
    hosts = max(1, count // PER_HOST)
    return f"1x{hosts}x{count // hosts}"


def plugin_version() -> str | None:
    try:
        return importlib.metadata.version("jax-cuda12-pjrt")
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> str:
    import jax

    return f"jax {jax.__version__}, jax-cuda12-pjrt {plugin_version() or 'not installed'}"


def gpu_devices(kind: str, count: int) -> list:
    """`count` compile-only devices of GPU `kind` (a key of GPUS) on `topology(count)`."""
    if plugin_version() is None or importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        raise ConfigError(f"--target gpu:{kind}-{count}: needs the GPU compiler, jax's CUDA plugin: pip install -e "
                          f"'.[gpu-plan]' (docs/plan.md); {versions()}")
    from jax._src import xla_bridge

    from glm5_jax.plan.devices import host_backend_cpu

    host_backend_cpu()
    shape = topology(count)
    topo = xla_bridge.make_pjrt_topology("cuda", shape, target_config=target_config(GPUS[kind]), topology=shape)
    return list(topo._make_compile_only_devices())

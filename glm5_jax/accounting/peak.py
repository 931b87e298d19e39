"""Peak FLOP/s of one device, the denominator of MFU: dense bf16 matmul peaks from the vendors' data sheets,
by device kind; CPU gets a nominal 1e11 FLOP/s per device so the figure is defined, not a measured peak (CPU
MFU is only comparable to itself). A recipe's `metrics.peak_flops` overrides the table."""

from __future__ import annotations

# (substring of jax Device.device_kind, lower-case) -> dense bf16 peak FLOP/s of one device.
PEAK_FLOPS = (
    ("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12), ("gh200", 989e12), ("b200", 2250e12),
    ("a100", 312e12), ("l40s", 362e12), ("v6 lite", 918e12), ("v6e", 918e12), ("v5 lite", 197e12),
    ("v5e", 197e12), ("v5p", 459e12), ("v5", 459e12), ("v4", 275e12), ("v3", 123e12), ("cpu", 1e11),
)
CPU_NOMINAL = 1e11


def peak_flops(device_kind: str, platform: str) -> float:
    kind = device_kind.lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    return CPU_NOMINAL if platform == "cpu" else float("nan")


def device_peak(configured: float | None, device) -> float:
    """The peak FLOP/s of one device for MFU: the recipe's `metrics.peak_flops` when set, else the table's."""
    return configured or peak_flops(device.device_kind, device.platform)

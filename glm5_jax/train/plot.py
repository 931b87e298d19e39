"""`glm5 plot RUN_DIR`: loss and throughput curves of a run (its metrics.jsonl, and eval.jsonl when the run
evaluates) as a PNG (matplotlib, Agg)."""

from __future__ import annotations

import os

from glm5_jax.checkpoint.outputs import atomic_file, check_output
from glm5_jax.errors import ConfigError
from glm5_jax.train.metrics import read_record


def read_records(run_dir: str, name: str = "metrics.jsonl") -> list[dict]:
    """The whole records of RUN_DIR/NAME (a torn line of a live or killed run is left out)."""
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        if name == "metrics.jsonl":
            raise ConfigError(f"{run_dir}: no metrics.jsonl (not a training run directory?)")
        return []
    with open(path, "rb") as f:
        return [r for r in (read_record(line) for line in f if line.strip()) if r is not None]


def plot(run_dir: str, out: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = check_output(out or os.path.join(run_dir, "curves.png"), "--out")
    records = read_records(run_dir)
    if not records:
        raise ConfigError(f"{run_dir}: metrics.jsonl holds no records yet")
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_tput) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in (("loss", "loss"), ("lm", "LM"), ("mtp", "MTP"), ("indexer_kl", "indexer KL")):
        values = [(s, r.get(key)) for s, r in zip(steps, records) if r.get(key) is not None]
        if values and (key == "loss" or any(v for _, v in values)):
            ax_loss.plot(*zip(*values), label=label, marker="." if len(values) < 50 else None)
    evals = [(e["step"], e["loss"]) for e in read_records(run_dir, "eval.jsonl") if e.get("loss") is not None]
    if evals:
        ax_loss.plot(*zip(*evals), label="eval loss (held out)", marker="o", linestyle="--", color="black")
    for i, r in enumerate(records):  # stage boundaries: each stage's first step is always logged
        if i and r["stage"] != records[i - 1]["stage"]:
            ax_loss.axvline(r["step"] - 0.5, color="grey", linestyle=":")
            ax_loss.text(r["step"] - 0.5, ax_loss.get_ylim()[1], f" {r['stage']}", va="top", fontsize=8)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    lines = []
    tput = [(s, r.get("tokens_per_s")) for s, r in zip(steps, records) if r.get("tokens_per_s")]
    if tput:
        lines += ax_tput.plot(*zip(*tput), color="tab:green", label="tokens/s (left)")
        _clip_top(ax_tput, [v for _, v in tput])
    ax_tput.set(xlabel="step", ylabel="tokens / s", title="throughput")
    mfu = [(s, 100 * r["mfu"]) for s, r in zip(steps, records) if r.get("mfu") is not None]
    if mfu:
        ax_mfu = ax_tput.twinx()
        lines += ax_mfu.plot(*zip(*mfu), color="tab:orange", alpha=0.6, label="MFU % (right)")
        ax_mfu.set_ylabel("MFU % (CPU: of a nominal peak)")
        _clip_top(ax_mfu, [v for _, v in mfu])
    if lines:
        ax_tput.legend(lines, [line.get_label() for line in lines], loc="lower right")
    ax_tput.grid(alpha=0.3)
    fig.suptitle(os.path.abspath(run_dir))
    fig.tight_layout()
    try:
        with atomic_file(out) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return out


def _clip_top(ax, values):
    """y from 0 to a little above the 95th percentile: one outlying step (the first after a compile or a
    resume) does not flatten the curve of the rest."""
    ordered = sorted(values)
    ax.set_ylim(0, 1.15 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))])

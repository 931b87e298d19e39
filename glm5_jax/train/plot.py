"""`glm5 plot RUN_DIR`: loss and throughput curves of a run (its metrics.jsonl, and eval.jsonl when the run
evaluates) as a PNG (matplotlib, Agg)."""

from __future__ import annotations

import os

from glm5_jax.checkpoint.outputs import atomic_file, check_output
from glm5_jax.errors import InputError
from glm5_jax.train.metrics import read_record

PLOTTED = ("loss", "lm", "mtp", "indexer_kl", "tokens_per_s", "mfu")  # the numbers the plot draws


def read_records(run_dir: str, name: str = "metrics.jsonl") -> list[dict]:
    """The whole records of RUN_DIR/NAME (a torn line of a live or killed run is left out); a record without
    an integer `step`, or with a plotted value that is not a number, is an InputError naming the line."""
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        if name == "metrics.jsonl":
            raise InputError(f"{run_dir}: no metrics.jsonl (not a training run directory?)")
        return []
    records = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            record = read_record(line) if line.strip() else None
            if record is not None:
                records.append(_checked(record, f"{path}: line {n}"))
    return records


def _checked(record: dict, where: str) -> dict:
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise InputError(f"{where}: step: need an integer step in every record; got {step!r}")
    for key in PLOTTED:
        v = record.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise InputError(f"{where}: {key}: must be a number; got {v!r}")
    if not isinstance(record.get("stage", ""), str):
        raise InputError(f"{where}: stage: must be a stage name; got {record['stage']!r}")
    return record


def title(run_dir: str) -> str:
    """The run directory as a reader knows it: relative to the working directory when under it, else its last
    two folders."""
    path = os.path.abspath(run_dir)
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else os.path.join(*path.split(os.sep)[-2:])


def plot(run_dir: str, out: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = check_output(out or os.path.join(run_dir, "curves.png"), "--out")
    records = read_records(run_dir)
    if not records:
        raise InputError(f"{run_dir}: metrics.jsonl holds no records yet")
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_tput) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in (("loss", "loss"), ("lm", "LM"), ("mtp", "MTP"), ("indexer_kl", "indexer KL")):
        values = [(s, r.get(key)) for s, r in zip(steps, records) if r.get(key) is not None]
        if values and (key == "loss" or any(v for _, v in values)):
            ax_loss.plot(*zip(*values), label=label, marker="." if len(values) < 50 else None)
    evals = [(e["step"], e["loss"]) for e in read_records(run_dir, "eval.jsonl") if e.get("loss") is not None]
    if evals:
        ax_loss.plot(*zip(*evals), label="eval loss (held out)", marker="o", linestyle="--", color="black")
    top, bottom = ax_loss.get_ylim()[1], ax_loss.get_ylim()[0]
    for i, r in enumerate(records):  # stages: each stage's first step is always logged
        if not i or r.get("stage") != records[i - 1].get("stage"):
            if i:
                ax_loss.axvline(r["step"] - 0.5, color="grey", linestyle=":")
            ax_loss.text(r["step"] - 0.5, top, f" {r.get('stage', '')}", va="top", fontsize=8)
        if r.get("resumed_from") is not None:  # the first step a resumed run trained
            ax_loss.axvline(r["resumed_from"] + 0.5, color="tab:red", linestyle="--", alpha=0.5)
            ax_loss.text(r["resumed_from"] + 0.5, bottom, f" resumed at {r['resumed_from']}", va="bottom",
                         fontsize=8, color="tab:red")
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
    fig.suptitle(f"{title(run_dir)}: steps {steps[0]}-{steps[-1]}")
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

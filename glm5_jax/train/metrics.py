"""Training metrics: JSONL log, TensorBoard event files, console lines / progress bar, MFU.

MFU = model FLOPs per step (`glm5_jax.accounting.analytic.model_flops_per_step`, model parts only: 6 N T for
the weights plus the attention core; no optimizer or rematerialisation work) divided by (step time x devices
x peak FLOP/s of one device, `glm5_jax.accounting.peak.peak_flops` or `metrics.peak_flops`); the trainer
computes it and logs it here.
"""

from __future__ import annotations

import json
import math
import os
import sys

from glm5_jax.checkpoint.outputs import writing


def _finite(x):
    return x if isinstance(x, (int, str)) or (isinstance(x, float) and math.isfinite(x)) else None


def read_record(line: bytes) -> dict | None:
    """A whole JSONL record (a JSON object ending in a newline), or None."""
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """`RUN_DIR/metrics.jsonl` (one record per logged step), TensorBoard events, console lines.

    Only the primary process (process 0 of a multi-process run) writes: the others' log is silent, since every
    value it would log is a global one, the same on every process."""

    def __init__(self, run_dir: str, resume_step: int, tensorboard: bool, progress: bool, total_steps: int,
                 primary: bool = True):
        self.primary = primary
        self.tb = self.progress = self.file = self.eval_file = None
        if not primary:
            return
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.eval_path = os.path.join(run_dir, "eval.jsonl")
        with writing(run_dir, "while opening the metrics logs"):
            os.makedirs(run_dir, exist_ok=True)
            for path in (self.path, self.eval_path):
                _truncate(path, resume_step)
            self.file = open(self.path, "a", buffering=1)  # noqa: SIM115 - open for the run, closed in close()
            self.eval_file = open(self.eval_path, "a", buffering=1)  # noqa: SIM115
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                print("glm5 train: tensorboardX is not installed; no TensorBoard events", file=sys.stderr)
        self.progress = None
        if progress and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.task = self.progress.add_task("train", total=total_steps, completed=resume_step, info="")
            self.progress.start()

    def advance(self, step: int, stage: str, loss: float | None = None):
        if self.primary and self.progress is not None:
            info = f"{stage}" + (f"  loss {loss:.4f}" if loss is not None else "")
            self.progress.update(self.task, completed=step, info=info)

    def write(self, record: dict):
        if not self.primary:
            return
        _append(self.file, self.path, {k: _finite(v) if isinstance(v, float) else v for k, v in record.items()})
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])
        self.line(format_record(record))

    def write_eval(self, record: dict):
        """An evaluation `{"step", "stage", "loss", "lm", "ppl", "tokens"}` (RL: held-out rewards,
        glm5_jax/rl/evaluate.py): a line of `RUN_DIR/eval.jsonl` and `eval/...` scalars in TensorBoard."""
        if not self.primary:
            return
        _append(self.eval_file, self.eval_path, {k: _finite(v) if isinstance(v, float) else v for k, v in record.items()})
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "stage") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"eval/{k}", v, record["step"])
        if "loss" in record:
            self.line(f"step {record['step']:>6}  [{record['stage']}]  eval loss {record['loss']:.4f}  "
                      f"lm {record['lm']:.4f}  ppl {record['ppl']:.2f}  ({record['tokens']:,} tokens)")
        else:  # (an RL evaluation: held-out rewards)
            self.line(f"step {record['step']:>6}  [{record['stage']}]  eval " + "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                if k not in ("step", "stage")))

    def line(self, text: str):
        if not self.primary:
            return
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self):
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        for f in (self.file, self.eval_file):
            if f is not None:
                f.close()


def _truncate(path: str, step: int):
    """Keep the whole records up to `step`: drop later ones (written after the checkpoint a resume starts from)
    and a torn last line (the process died mid-write), which would otherwise break every reader."""
    if not os.path.exists(path):
        return
    keep, dropped = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            record = read_record(line)
            if record is None:  # torn or corrupt: nothing after it is trusted
                dropped += 1 + sum(1 for _ in f)
                break
            if record.get("step", 0) <= step:
                keep.append(line)
    if dropped:
        print(f"glm5 train: {path}: dropped {dropped} torn or unreadable line(s) at the end", file=sys.stderr)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _append(f, path: str, record: dict):
    """One JSON line to an open log; a write that fails (disk full, ...) is one line naming the file."""
    with writing(path, "while training"):
        f.write(json.dumps(record) + "\n")
        f.flush()


def format_record(r: dict) -> str:
    parts = [f"step {r['step']:>6}", f"[{r['stage']}]", f"loss {r['loss']:.4f}"]
    if r.get("scored_share") is not None:  # (sft: the assistant-token loss and the share of tokens scored)
        parts += [f"lm {r['lm']:.4f}", f"scored {100 * r['scored_share']:.0f}%"]
    for key in ("mtp", "balance", "indexer_kl"):
        if r.get(key) is not None:
            parts.append(f"{key} {r[key]:.4g}")
    parts += [f"gnorm {r['grad_norm']:.3g}", f"lr {r['lr']:.3g}", f"{r['tokens_per_s']:,.0f} tok/s",
              f"MFU {100 * r['mfu']:.2f}%", f"{1000 * r['step_time']:.0f} ms/step"]
    if r.get("reward_mean") is not None:  # (an RL step that rolled out: rewards, answers, phases' seconds)
        parts[3:3] = [f"reward {r['reward_mean']:.3f} (group std {r['reward_group_std']:.3f})",
                      f"answer {r['response_len_mean']:.1f} tok", f"entropy {r['entropy']:.3f}",
                      f"clipped {100 * r['clipped_share']:.1f}%"]
        if "generate_s" in r:  # (synchronous: the rollout's phases)
            parts.insert(7, f"generate {r['generate_s']:.1f} s  reward {r['reward_s']:.1f} s")
        else:  # (asynchronous: how fresh the samples were, how long the trainer waited for them)
            parts.insert(7, f"staleness {r['staleness_mean']:.2f} (max {r['staleness_max']})  dropped "
                            f"{r['dropped_stale']}  waited {r['wait_s']:.2f} s  rollout busy {100 * r['rollout_busy']:.0f}%")
    if r.get("expert_load_max_over_mean") is not None:
        parts.append(f"load max/mean {r['expert_load_max_over_mean']:.2f}")
    if r.get("skipped"):
        parts.append(f"skipped {r['skipped']}")
    return "  ".join(parts)

"""``glm5 data inspect``: the stage table, a few decoded packed rows coloured by segment (chat stages: each
conversation with its scored tokens marked), packing efficiency, overlong conversations, the measured
throughput of this process, and optionally the first rows written to an ``.npz`` file."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from glm5_jax.checkpoint.outputs import atomic_file, check_output
from glm5_jax.errors import InputError

from . import config as data_config
from .errors import overlong_counts, skipped_counts
from .loader import DataPipeline
from .packing import IGNORE, packing_stats

_PIPED_WIDTH = 500
_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red")


def _visible(text: str) -> str:
    # Newlines and tabs would break the row layout; show them as symbols.
    return text.replace("\n", "⏎").replace("\t", "→").replace("\r", "␍")


def _si(n: int) -> str:
    """1234567 -> 1.23M (below a million: exact): token counts of real recipes run to trillions."""
    if n < 10**6:
        return f"{n:,}"
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _rope(rope: dict | None) -> str:
    if rope is None:
        return "-"
    out = f"{rope['rope_theta']:g}" if "rope_theta" in rope else "model's"
    return out + (f" x{rope['factor']:g}" if rope.get("rope_type") == "linear" else "")


def stage_table(pipe: DataPipeline) -> Table:
    n = pipe.process_count
    table = Table(title=f"stages ({n} process{'es' if n > 1 else ''})")
    for col in ("stage", "seq", "tok/step", "batch", "per proc", "steps", "from step", "tokens", "rope θ", "mixture"):
        table.add_column(col, justify="left" if col in ("stage", "mixture") else "right")
    for s in pipe.schedule.stages:
        table.add_row(s.name, _si(s.seq_len), _si(s.tokens_per_step), str(s.global_batch), str(s.local_batch),
                      f"{s.steps:,}", f"{s.start_step:,}", _si(s.steps * s.tokens_per_step), _rope(s.rope),
                      " ".join(f"{k}:{v:g}" for k, v in s.mixture.items()))
    return table


def row_text(pipe: DataPipeline, batch: dict, r: int, chars: int) -> Text:
    """Row ``r`` decoded segment by segment, each in its own colour; padding dimmed."""
    ids, seg = batch["input_ids"][r], batch["segment_ids"][r]
    out = Text()
    starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
    for s, e in zip(starts, np.r_[starts[1:], len(seg)]):
        if len(out) >= chars:
            out.append(" …", style="dim")
            break
        if seg[s] == 0:
            out.append(f"[{e - s} pad]", style="dim")
            continue
        text = _visible(pipe.tokenizer.decode(ids[s:e]))
        out.append(text[: max(chars - len(out), 0)], style=_COLOURS[(int(seg[s]) - 1) % len(_COLOURS)])
    return out


def chat_text(pipe: DataPipeline, batch: dict, r: int, chars: int, brackets: bool) -> Text:
    """Row ``r``'s conversations, one per line, scored tokens (those a target predicts) underlined in green,
    or in ⟦ ⟧ when ``brackets`` (output piped to a file)."""
    seg, tgt, ids = batch["segment_ids"][r], batch["targets"][r], batch["input_ids"][r]
    scored = np.r_[False, tgt[:-1] != IGNORE]
    out = Text()
    for c in range(1, int(seg.max()) + 1):
        where = np.flatnonzero(seg == c)
        line = Text(f"\n  conversation {c}: ", style="bold")
        cuts = np.flatnonzero(np.diff(scored[where].astype(np.int8))) + 1
        for run in np.split(where, cuts):
            if len(line) >= chars:
                line.append(" …", style="dim")
                break
            eos = " <eos>" if ids[run[-1]] == pipe.tokenizer.eos_id else ""
            text = _visible(pipe.tokenizer.decode(ids[run]) + eos)[: chars - len(line)]
            if scored[run[0]]:
                line.append(f"⟦{text}⟧" if brackets else text, style=None if brackets else "underline green")
            else:
                line.append(text, style="dim" if not brackets else None)
        out += line
    return out


def check_out(write_rows: int, out: str | None) -> None:
    """``--write-rows`` / ``--out`` usable, checked before any data is read."""
    if write_rows < 0:
        raise InputError(f"--write-rows: must be an integer >= 0; got {write_rows}")
    if bool(write_rows) != bool(out):
        raise InputError("--write-rows and --out go together: --write-rows N --out FILE.npz")
    if out is None:
        return
    if not out.endswith(".npz") or os.path.isdir(out):
        raise InputError(f"--out: {out}: must be a file name ending in .npz")
    check_output(out, "--out")


def write_rows_npz(it, first: dict, n: int, out: str) -> None:
    """The first ``n`` rows of the stage (``input_ids``, ``targets``, ``positions``, ``segment_ids``,
    ``loss_mask`` = targets != -1) to ``out``."""
    batches = [first]
    while sum(len(b["input_ids"]) for b in batches) < n:
        batches.append(next(it))
    rows = {k: np.concatenate([b[k] for b in batches])[:n] for k in ("input_ids", "targets", "positions",
                                                                       "segment_ids")}
    with atomic_file(out) as tmp:
        np.savez(tmp, **rows, loss_mask=rows["targets"] != IGNORE)


def _counts() -> dict:
    """Records skipped and conversations truncated / dropped so far in this process."""
    overlong = overlong_counts().values()
    return {"skipped": sum(skipped_counts().values()), "truncated": sum(c["truncated"] for c in overlong),
            "dropped": sum(c["dropped"] for c in overlong)}


def inspect(config: str, rows: int = 4, stage: str | None = None, batches: int = 20, chars: int = 400,
            overrides=(), console: Console | None = None, write_rows: int = 0, out: str | None = None) -> dict:
    """Print the report; return the measured figures (efficiency, tokens/s, ...)."""
    # Piped (not a terminal): full width, so no table column is cut to fit a default 80 characters.
    console = console or Console(width=None if sys.stdout.isatty() else _PIPED_WIDTH)
    check_out(write_rows, out)
    cfg = data_config.load(config, overrides)
    before = _counts()  # (the counters are the process's: report what this inspection adds)
    pipe = DataPipeline(cfg, 0, 1)
    console.print(stage_table(pipe))
    st = pipe.schedule.by_name(stage) if stage else pipe.schedule.stages[0]
    chat = pipe.is_chat(st)
    it = iter(pipe.dataset(st))
    first = next(it)
    shown = ("scored tokens " + ("in ⟦ ⟧" if not console.is_terminal else "underlined")) if chat else \
        "rows coloured by segment"
    console.print(f"\n[bold]stage {st.name}[/]: {st.local_batch} rows x {st.seq_len} tokens per step, "
                  f"tokenizer {pipe.tokenizer.name} (vocab {pipe.vocab_size}); {shown}")
    for r in range(min(rows, st.local_batch)):
        n = int(first["segment_ids"][r].max())
        head = Text(f"row {r} ({n} {'conversation' if chat else 'segment'}{'s' if n != 1 else ''}): ", style="bold")
        console.print(head + (chat_text(pipe, first, r, chars, not console.is_terminal) if chat else
                              row_text(pipe, first, r, chars)))
    if write_rows:
        write_rows_npz(it, first, write_rows, out)
        console.print(f"wrote the first {write_rows} rows of stage {st.name} to {out}")
    start = time.perf_counter()
    measured = [next(it) for _ in range(batches)]
    seconds = time.perf_counter() - start
    it.close()
    stats = [packing_stats(b) for b in [first, *measured]]
    tokens, real, loss = (sum(s[k] for s in stats) for k in ("tokens", "real", "loss"))
    counts = {k: v - before[k] for k, v in _counts().items()}
    result = {"stage": st.name, "efficiency": real / tokens, "loss_fraction": loss / tokens,
              "tokens_per_second": batches * st.local_batch * st.seq_len / seconds if batches else float("nan"),
              **counts}
    console.print(f"\npacking efficiency {result['efficiency']:.2%} (non-pad tokens / all, {len(stats)} batches); "
                  f"{result['loss_fraction']:.2%} of tokens have a target; {result['skipped']} bad records skipped")
    if chat:
        console.print(f"conversations longer than a row: {result['truncated']} truncated, {result['dropped']} dropped")
    if batches:
        console.print(f"throughput {result['tokens_per_second']:,.0f} tokens/s in this process "
                      f"({batches} batches, {cfg.num_workers} workers, {cfg.read_threads} read threads)")
    return result

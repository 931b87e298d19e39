"""``glm5 data inspect``: the stage table, a few decoded packed rows coloured by segment, packing efficiency
and the measured throughput of this process."""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import config as data_config
from .errors import skipped_counts
from .loader import DataPipeline
from .packing import packing_stats

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


def inspect(config: str, rows: int = 4, stage: str | None = None, batches: int = 20, chars: int = 400,
            overrides=(), console: Console | None = None) -> dict:
    """Print the report; return the measured figures (efficiency, tokens/s, ...)."""
    console = console or Console()
    cfg = data_config.load(config, overrides)
    pipe = DataPipeline(cfg, 0, 1)
    console.print(stage_table(pipe))
    st = pipe.schedule.by_name(stage) if stage else pipe.schedule.stages[0]
    it = iter(pipe.dataset(st))
    first = next(it)
    console.print(f"\n[bold]stage {st.name}[/]: {st.local_batch} rows x {st.seq_len} tokens per step, "
                  f"tokenizer {pipe.tokenizer.name} (vocab {pipe.vocab_size}); rows coloured by segment")
    for r in range(min(rows, st.local_batch)):
        n = int(first["segment_ids"][r].max())
        console.print(Text(f"row {r} ({n} segment{'s' if n != 1 else ''}): ", style="bold") +
                      row_text(pipe, first, r, chars))
    start = time.perf_counter()
    measured = [next(it) for _ in range(batches)]
    seconds = time.perf_counter() - start
    it.close()
    stats = [packing_stats(b) for b in [first, *measured]]
    tokens, real, loss = (sum(s[k] for s in stats) for k in ("tokens", "real", "loss"))
    result = {"stage": st.name, "efficiency": real / tokens, "loss_fraction": loss / tokens,
              "tokens_per_second": batches * st.local_batch * st.seq_len / seconds if batches else float("nan"),
              "skipped": sum(skipped_counts().values())}
    console.print(f"\npacking efficiency {result['efficiency']:.2%} (non-pad tokens / all, {len(stats)} batches); "
                  f"{result['loss_fraction']:.2%} of tokens have a target; {result['skipped']} bad records skipped")
    if batches:
        console.print(f"throughput {result['tokens_per_second']:,.0f} tokens/s in this process "
                      f"({batches} batches, {cfg.num_workers} workers, {cfg.read_threads} read threads)")
    return result

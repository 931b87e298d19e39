"""Data pipeline throughput: tokens per second per process at 4K and 128K rows, byte-level and BPE tokenizers.

The corpus is the embedded default (the standard library's .py files). There is no network here to fetch
GLM-5's tokenizer.json, so the BPE case uses a byte-level BPE ``tokenizer.json`` trained by this script with
the ``tokenizers`` library on every fourth standard-library file (same kind of tokenizer, smaller vocabulary).

    .venv/bin/python benchmarks/data_throughput.py [--seconds 8] [--workers 0] [--bpe-vocab 32768]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time

import grain
import jax

from glm5_jax.data import config as data_config
from glm5_jax.data.corpus import stdlib_files
from glm5_jax.data.loader import DataPipeline
from glm5_jax.data.tokenizer import train_bpe

ROWS = {4096: 8, 131072: 1}  # rows per batch: 32K and 128K tokens per batch


def corpus_texts(step: int = 4):
    for path in stdlib_files()[::step]:
        with open(path, "rb") as f:
            yield f.read().decode("utf-8", errors="replace")


def measure(tokenizer: dict, seq_len: int, seconds: float, workers: int, threads: int) -> tuple[float, int]:
    rows = ROWS[seq_len]
    cfg = data_config.from_dict({
        "tokenizer": tokenizer, "sources": {"stdlib": {"kind": "stdlib"}},
        "stages": [{"name": "bench", "seq_len": seq_len, "tokens_per_step": rows * seq_len,
                    "tokens": 10**12, "mixture": {"stdlib": 1}}],
        "num_workers": workers, "read_threads": threads})
    it = DataPipeline(cfg, 0, 1).iterator()
    for _ in range(2):  # warm-up: threads and workers started, first documents read
        next(it)
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        batches += 1
    elapsed = time.perf_counter() - start
    it.close()
    return batches * rows * seq_len / elapsed, batches


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per case")
    parser.add_argument("--workers", type=int, default=0, help="mp_prefetch worker processes")
    parser.add_argument("--threads", type=int, default=2, help="read threads per process")
    parser.add_argument("--bpe-vocab", type=int, default=32768)
    args = parser.parse_args()
    # A few stdlib test files are deliberately not UTF-8; the pipeline skips and logs them every epoch.
    logging.getLogger("glm5_jax.data.errors").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = train_bpe(corpus_texts(), args.bpe_vocab, os.path.join(tmp, "tokenizer.json"))
        print(f"trained a {args.bpe_vocab}-id byte-level BPE on 1/4 of the stdlib in {time.perf_counter() - start:.0f} s")
        tokenizers = {"bytes (built-in)": {"kind": "bytes"},
                      f"BPE tokenizer.json ({args.bpe_vocab // 1024}K)": {"kind": "hf", "path": path,
                                                                           "eos_token": "<|endoftext|>"}}
        print(f"\nPython {platform.python_version()}, jax {jax.__version__}, grain {grain.__version__}, "
              f"{os.cpu_count()} CPUs, {args.workers} workers, {args.threads} read threads, {args.seconds:g} s/case\n")
        print("| tokenizer | seq_len | rows/batch | batches timed | tokens/s per process |")
        print("|---|---|---|---|---|")
        for name, tok in tokenizers.items():
            for seq_len, rows in ROWS.items():
                rate, batches = measure(tok, seq_len, args.seconds, args.workers, args.threads)
                print(f"| {name} | {seq_len:,} | {rows} | {batches} | {rate:,.0f} |", flush=True)


if __name__ == "__main__":
    main()

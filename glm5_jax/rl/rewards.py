"""Rewards for RL on the model's own rollouts (docs/post-training.md, "Rewards").

A reward function is `fn(response: str, item: dict) -> float` (or a `Score`, to give a reason), where `item`
is the prompt's record (`prompt` plus task fields such as `answer` or `tests`). `load_reward` resolves a
built-in name or the user's own `package.module:function`; `RewardPool` scores many samples in worker
processes, each under a time limit, and turns a function that raises, hangs, dies or returns a non-number
into a failed sample instead of an error of the run.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import numbers
import re
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait

from glm5_jax.errors import ConfigError
from glm5_jax.rl import sandbox


@dataclasses.dataclass(frozen=True)
class Score:
    """`reward`: the sample's reward, or None when scoring failed (counted, and left out of the update);
    `reason`: why it failed, or why a code answer scored 0 (empty otherwise)."""

    reward: float | None
    reason: str = ""


def final_answer(response: str) -> str:
    """The text after the last "answer:" (any case) of `response`, else the whole response; stripped."""
    parts = re.split(r"answer:", response, flags=re.IGNORECASE)
    return parts[-1].strip()


def exact_match(response: str, item: dict) -> float:
    """1.0 when the response's final answer equals `item["answer"]` (both stripped), else 0.0."""
    return float(final_answer(response) == str(item["answer"]).strip())


def math_answer(response: str, item: dict) -> Score:
    """math-verify: 1.0 when `verify(parse(item["answer"]), parse(response))` holds, else 0.0. math-verify
    finds the answer in the response itself (a LaTeX `$...$` or `\\boxed{}` expression, or a plain number)."""
    from math_verify import parse, verify

    gold = parse(str(item["answer"]))
    if not gold:
        return Score(None, f"the answer {str(item['answer'])[:80]!r} does not parse")
    return Score(float(verify(gold, parse(response))))


def code_block(response: str) -> str:
    """The last fenced code block (```...```, any language tag) of `response`, else the whole response."""
    blocks = re.findall(r"```[^\n`]*\n(.*?)```", response, flags=re.DOTALL)
    return blocks[-1] if blocks else response


def code(response: str, item: dict) -> Score:
    """Runs the response's code (`code_block`) followed by `item["tests"]` in the sandbox, with the item's
    `files`, `time_limit` (default 10 s) and `memory_mb` (default 512): 1.0 when it runs to its end (or the
    tests end it with status 0, as `unittest.main()` does), else 0.0 with the sandbox's reason; an answer that
    exits with status 0 before the tests run scores 0.0."""
    answer = code_block(response) + "\n\n"
    result = sandbox.run(answer + item["tests"] + "\n", files=item.get("files"),
                         time_limit=float(item.get("time_limit", 10.0)), memory_mb=int(item.get("memory_mb", 512)))
    tests_line = answer.count("\n") + 1
    if result.ok and result.exit_line is not None and result.exit_line < tests_line:
        return Score(0.0, f"the answer exited (line {result.exit_line}) before the tests ran")
    return Score(1.0 if result.ok else 0.0, result.reason)


def similarity(response: str, item: dict) -> float:
    """Partial credit: difflib's similarity ratio (2 x matched characters / total characters, in [0, 1]) of
    the final answer (`final_answer`, backticks stripped) to `item["answer"]`; 1.0 exactly when they are
    equal. The toy task's reward (configs/recipes/quickstart-rl.yaml): a near miss earns more than noise, so a
    small model's group rewards differ from the first step on."""
    import difflib

    return difflib.SequenceMatcher(None, final_answer(response).strip("`"), str(item["answer"]).strip()).ratio()


BUILTINS = {"exact_match": exact_match, "math": math_answer, "code": code, "similarity": similarity}


def load_reward(spec: str, key: str = "rl.reward"):
    """The reward function `spec` names: a built-in (`exact_match`, `math`, `code`, `similarity`) or the user's own
    `package.module:function`. Raises ConfigError, one line naming `key`, the path and the cause, when it does
    not import, lacks the attribute or is not callable."""
    if spec in BUILTINS:
        if spec == "math" and importlib.util.find_spec("math_verify") is None:
            raise ConfigError(f"{key}: math: needs the math-verify package (pip install math-verify)")
        return BUILTINS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}: {spec!r}: neither a built-in reward ({', '.join(sorted(BUILTINS))}) nor a "
                          "package.module:function path")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"{key}: {spec}: no module named {e.name!r}") from None
    except Exception as e:  # noqa: BLE001 -- the user's module raised while importing: name it, one line
        raise ConfigError(f"{key}: {spec}: importing {module_name} raised {_one_line(e)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: {spec}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}: {spec}: a {type(obj).__name__}, not a function")
    return obj


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def to_score(value) -> Score:
    """A reward function's result as a Score: a finite real number, or a Score; anything else fails."""
    if isinstance(value, Score):
        return value if value.reward is None or math.isfinite(value.reward) else Score(None, "non-finite reward")
    if not isinstance(value, numbers.Real):
        return Score(None, f"the reward is a {type(value).__name__}, not a number")
    if not math.isfinite(float(value)):
        return Score(None, f"non-finite reward {float(value)}")
    return Score(float(value))


# A worker: a fresh interpreter with the parent's sys.path that imports only this module (not the parent's
# __main__, as multiprocessing's spawn would: a training script's JAX, for one).
WORKER = ("import json, sys; sys.path[:0] = json.loads(sys.argv[3]); from glm5_jax.rl.rewards import worker; "
          "worker(sys.argv[1], int(sys.argv[2]))")


def worker(spec: str, fd: int) -> None:
    """A worker process: loads the function once, then scores (index, response, item) until told to stop."""
    conn = Connection(fd)
    try:
        fn = load_reward(spec)
    except ConfigError as e:
        conn.send(("error", str(e)))
        return
    try:
        conn.send(("ready", None))
        while (job := conn.recv()) is not None:
            index, response, item = job
            try:
                score = to_score(fn(response, item))
            except Exception as e:  # noqa: BLE001 -- a failing reward fails its sample, never the run
                score = Score(None, _one_line(e))
            conn.send((index, score))
    except (EOFError, OSError):  # the pool's process is gone: so is this worker, quietly
        return


class RewardPool:
    """`workers` processes (fresh interpreters: the parent holds JAX and is never forked) scoring with the
    reward `fn_spec`; each sample gets `timeout` seconds, after which its worker is killed and replaced. Reuse
    one pool across steps; `close()` it (or use it as a context manager)."""

    def __init__(self, fn_spec: str, workers: int = 4, timeout: float = 30.0, key: str = "rl.reward"):
        load_reward(fn_spec, key)  # the one-line error, here in the parent, before any worker starts
        if workers < 1 or timeout <= 0:
            raise ConfigError(f"{key}: workers {workers} must be >= 1 and timeout {timeout} > 0")
        self.spec, self.timeout, self.key = fn_spec, timeout, key
        self._workers = [self._start() for _ in range(workers)]

    def _start(self):
        parent, child = socket.socketpair()
        with child:
            proc = subprocess.Popen([sys.executable, "-c", WORKER, self.spec, str(child.fileno()),
                                     json.dumps(sys.path)], pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        return {"proc": proc, "conn": Connection(parent.detach()), "ready": False, "job": None, "deadline": None}

    def _replace(self, w) -> None:
        w["proc"].kill()
        w["proc"].wait()
        w["conn"].close()
        w.update(self._start())

    def score(self, jobs: list[tuple[str, dict]]) -> list[Score]:
        """Scores of (response, item) pairs, in input order; never raises for a sample's error."""
        if not self._workers:
            raise ValueError("RewardPool.score on a closed pool")
        results: list[Score | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))[::-1]
        while pending or any(w["job"] is not None for w in self._workers):
            for w in self._workers:
                if w["ready"] and w["job"] is None and pending:
                    index = pending.pop()
                    w["job"], w["deadline"] = index, time.monotonic() + self.timeout
                    w["conn"].send((index, *jobs[index]))
            deadlines = [w["deadline"] for w in self._workers if w["job"] is not None]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            ready = wait([w["conn"] for w in self._workers], timeout=wait_s)
            for w in self._workers:
                if w["conn"] in ready:
                    self._receive(w, results)
                elif w["job"] is not None and time.monotonic() >= w["deadline"]:
                    results[w["job"]] = Score(None, f"timed out after {self.timeout:g} s")
                    self._replace(w)
        return results

    def _receive(self, w, results) -> None:
        try:
            tag, value = w["conn"].recv()
        except (EOFError, OSError):  # the worker died (os._exit, a crash, the kernel's OOM killer)
            died = f"the reward worker died (exit code {w['proc'].wait()})"
            if not w["ready"]:
                self.close()
                raise ConfigError(f"{self.key}: {self.spec}: {died} while loading the function") from None
            if w["job"] is not None:
                results[w["job"]] = Score(None, died)
            self._replace(w)
            return
        if tag == "error":
            self.close()
            raise ConfigError(value)
        if tag == "ready":
            w["ready"] = True
            return
        results[tag], w["job"], w["deadline"] = value, None, None

    def close(self) -> None:
        for w in self._workers:
            try:
                w["conn"].send(None)
            except OSError:
                pass
            try:
                w["proc"].wait(timeout=1)
            except subprocess.TimeoutExpired:
                w["proc"].kill()
                w["proc"].wait()
            w["conn"].close()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def score_all(fn: str, jobs: list[tuple[str, dict]], *, timeout: float, workers: int) -> list[Score]:
    """Scores of `jobs` with the reward `fn` (a spec, as `load_reward` takes) in a pool made for this call."""
    with RewardPool(fn, workers, timeout) as pool:
        return pool.score(jobs)

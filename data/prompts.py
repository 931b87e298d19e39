"""Prompt sources of RL stages (format `prompts`, docs/post-training.md): records that hold a prompt and the
fields a reward checks it against, the held-out split, the order rollouts take them in, and their token ids
as the model is asked them (the chat format's generation prompt).

A record is a dict: its prompt under the source's `text_field` (`prompt`: a string, the user's message, or a
list of chat messages), the rest (`answer`, `tests`, ...) for the reward. Kinds: `jsonl` (one object a line)
and `pattern`, the embedded toy task: continue a repeating pattern, "Continue: k7 k7 k7" answered by
"k7 k7 k7 k7 k7 k7 k7 k7 " (the pattern's next 24 characters, the CPU recipe's answer length), over every unit
of one or two lowercase letters or digits.
"""

from __future__ import annotations

import functools
import hashlib
import json

import numpy as np

from glm5_jax.errors import ConfigError, DataError

from .chat import GLMRenderer, parse_messages
from .chat_template import TemplateRenderer
from .sources import expand_paths


@functools.lru_cache(maxsize=1)
def pattern_records() -> tuple[dict, ...]:
    """The toy task: one record per unit of one or two characters from [a-z0-9], in a fixed order; the answer
    is the pattern's next 24 characters."""
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    units = list(chars) + [a + b for a in chars for b in chars]
    return tuple({"prompt": f"Continue: {u} {u} {u}", "answer": ((u + " ") * 24)[:24]} for u in units)


def read_records(source_cfg, policy) -> list[dict]:
    """Every record of a `prompts` source; a line that is not a JSON object with the prompt field goes
    through the error policy."""
    if source_cfg.kind == "pattern":
        return [dict(r) for r in pattern_records()]
    from .errors import Bad

    out = []
    for path in expand_paths(source_cfg.name, source_cfg.paths, policy):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    policy.handle(source_cfg.name, Bad(f"{path}:{n}", f"not valid JSON ({e.msg})"))
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get(source_cfg.text_field), (str, list)):
                    policy.handle(source_cfg.name, Bad(f"{path}:{n}", f"no {source_cfg.text_field!r} string or "
                                                                       "message list"))
                    continue
                out.append(obj)
    if not out:
        raise DataError(f"source {source_cfg.name}: no prompt records")
    return out


def held_out(record: dict, field: str, fraction: float) -> bool:
    """Whether a record is in the held-out share `fraction` (by a hash of its prompt: the same on every run)."""
    digest = hashlib.sha256(json.dumps(record[field], sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


class PromptSet:
    """A stage's prompt records, split into training (`train`) and held-out (`eval`) ones, with their token ids
    (`train_ids`, `eval_ids`: each prompt rendered and tokenized once).

    `batch(k, n)`: the indices into `train` of the n prompts of rollout k, epoch after epoch through a seeded
    shuffle (a function of k alone, so a resumed run asks the same prompts); `draw(i)`: the i-th of that order."""

    def __init__(self, data_cfg, stage_name: str, tokenizer, policy, holdout: float = 0.0):
        stage = next(s for s in data_cfg.stages if s.name == stage_name)
        if len(stage.mixture) != 1:
            raise ConfigError(f"stages.{stage_name}.mixture: an RL stage reads one prompts source; got "
                              f"{', '.join(stage.mixture)}")
        cfg = data_cfg.sources[next(iter(stage.mixture))]
        self.field, self.seed = cfg.text_field, data_cfg.seed
        renderer = GLMRenderer(tokenizer) if cfg.template is None else TemplateRenderer(cfg.template, tokenizer)
        records = read_records(cfg, policy)
        split = [held_out(r, self.field, holdout) for r in records]
        self.train = [r for r, h in zip(records, split) if not h]
        self.eval = [r for r, h in zip(records, split) if h]
        if not self.train:
            raise ConfigError(f"eval.holdout: {holdout} leaves no training prompt in source {cfg.name}")
        self.train_ids = [generation_prompt(renderer, r[self.field]) for r in self.train]
        self.eval_ids = [generation_prompt(renderer, r[self.field]) for r in self.eval]

    def batch(self, k: int, n: int) -> list[int]:
        """The indices into `train` of the n prompts of rollout k."""
        return [self.draw(i) for i in range(k * n, (k + 1) * n)]

    def draw(self, i: int) -> int:
        """The index into `train` of the i-th prompt drawn (0, 1, ...: rollout k of n prompts draws k*n ...)."""
        epoch, at = divmod(i, len(self.train))
        return int(self._order(epoch)[at])

    def _order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_epoch", None) != epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
        return self._perm


def generation_prompt(renderer, prompt) -> np.ndarray:
    """Token ids int32 of a prompt (a user message, or a message list) up to where the assistant answers: the
    chat template's generation prompt; GLM-5's format opens the answer with an empty `<think></think>`."""
    messages = parse_messages([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
    if isinstance(renderer, TemplateRenderer):
        text = renderer.text([m.as_dict() for m in messages], add_generation_prompt=True)
        return np.asarray(renderer.tokenizer.encode(text), np.int32)
    ids, _ = renderer.render(messages)
    sp = renderer.sp
    return np.concatenate([ids[:-1], renderer.role["assistant"], sp["<think>"], sp["</think>"]]).astype(np.int32)


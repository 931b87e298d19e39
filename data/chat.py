"""Chat records -> token ids with a per-token loss mask, in GLM-5's chat format (docs/post-training.md).

A record is a list of messages ``{role, content, reasoning_content?, tool_calls?, loss?}``. The built-in
renderer writes the GLM-5 format piece by piece, tokenizing each text piece on its own and concatenating the
ids, so which tokens are scored is exact per token (token in, token out)::

    [gMASK]<sop><|system|>{content}<|user|>{content}<|assistant|><think>{reasoning}</think>{content}
    <tool_call>{name}<arg_key>{k}</arg_key><arg_value>{v}</arg_value></tool_call><|observation|>
    <tool_response>{content}</tool_response><|assistant|>...<eos>

Scored tokens: everything an assistant message writes after its ``<|assistant|>`` token (thinking, content,
tool calls) and the token that closes it (the next message's role token, or EOS after the last message),
unless the message says ``loss: false``. :class:`ChatEncoder` turns a record into ``{"input_ids",
"scored"}`` for the whole-conversation packer; the batch's ``targets`` are -1 where the predicted token is
not scored (:func:`glm5_jax.data.packing.make_batch`).
"""

from __future__ import annotations

import json

import numpy as np

from glm5_jax.errors import DataError

from .errors import MAX_CONSECUTIVE_SKIPS, Bad, ErrorPolicy, count_overlong
from .packing import Encoder

ROLES = ("system", "user", "assistant", "observation")
ROLE_ALIASES = {"tool": "observation"}  # the OpenAI name of a tool result


class Message:
    """One validated message; ``tool_calls`` is a list of ``(name, arguments dict)``."""

    __slots__ = ("content", "loss", "reasoning", "role", "tool_calls")

    def __init__(self, role, content="", reasoning=None, tool_calls=(), loss=True):
        self.role, self.content, self.reasoning = role, content, reasoning
        self.tool_calls, self.loss = list(tool_calls), loss

    @property
    def scored(self) -> bool:
        return self.role == "assistant" and self.loss

    def as_dict(self) -> dict:
        """The message as chat templates read it (OpenAI-style tool calls)."""
        out = {"role": "tool" if self.role == "observation" else self.role, "content": self.content}
        if self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = [{"type": "function", "function": {"name": n, "arguments": a}}
                                 for n, a in self.tool_calls]
        return out


def _tool_call(i: int, j: int, call) -> tuple[str, dict]:
    key = f"messages.{i}.tool_calls.{j}"
    if not isinstance(call, dict):
        raise ValueError(f"{key} must be an object with name and arguments")
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    name, args = fn.get("name"), fn.get("arguments")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{key} has no name")
    if args is None:
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{key}.arguments is a string but not JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise ValueError(f"{key}.arguments must be an object (or its JSON text)")
    return name, args


def parse_messages(messages) -> list[Message]:
    """Validated messages of a record; raises ValueError with a one-line reason naming the message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages.{i} must be an object with role and content")
        role = ROLE_ALIASES.get(m.get("role"), m.get("role"))
        if role not in ROLES:
            raise ValueError(f"messages.{i}.role: unknown role {m.get('role')!r}; roles: {', '.join(ROLES)}")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"messages.{i}.content must be a string")
        reasoning, calls, loss = m.get("reasoning_content"), m.get("tool_calls") or [], m.get("loss")
        if role != "assistant" and (reasoning is not None or calls or loss is not None):
            raise ValueError(f"messages.{i}: reasoning_content, tool_calls and loss belong to assistant messages")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"messages.{i}.reasoning_content must be a string")
        if not isinstance(calls, list):
            raise ValueError(f"messages.{i}.tool_calls must be a list")
        if loss is not None and not isinstance(loss, bool):
            raise ValueError(f"messages.{i}.loss must be true or false")
        out.append(Message(role, content, reasoning, [_tool_call(i, j, c) for j, c in enumerate(calls)],
                           loss is not False))
    return out


def _value_text(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


class GLMRenderer:
    """GLM-5's chat format with the given tokenizer (special tokens looked up by text: errors at construction)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        sp = tokenizer.special_id
        self.prefix = np.array([sp("[gMASK]"), sp("<sop>")], np.int32)
        self.role = {r: np.array([sp(f"<|{r}|>")], np.int32) for r in ROLES}
        self.sp = {t: np.array([sp(t)], np.int32) for t in (
            "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
            "</arg_value>", "<tool_response>", "</tool_response>")}
        self.eos = np.array([tokenizer.eos_id], np.int32)

    def _body(self, m: Message) -> list[np.ndarray]:
        enc, sp = self.tokenizer.encode, self.sp
        if m.role == "observation":
            return [sp["<tool_response>"], enc(m.content), sp["</tool_response>"]]
        if m.role != "assistant":
            return [enc(m.content)]
        parts = [sp["<think>"], enc(m.reasoning or ""), sp["</think>"], enc(m.content)]
        for name, args in m.tool_calls:
            parts += [sp["<tool_call>"], enc(name)]
            for k, v in args.items():
                parts += [sp["<arg_key>"], enc(str(k)), sp["</arg_key>"], sp["<arg_value>"], enc(_value_text(v)),
                          sp["</arg_value>"]]
            parts.append(sp["</tool_call>"])
        return parts

    def render(self, messages: list[Message]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32[n], scored bool[n]) of a conversation, EOS at its end."""
        ids, scored = [self.prefix], [np.zeros(2, bool)]
        closes = False  # the previous message is a scored assistant: this message's role token closes it
        for m in messages:
            body = np.concatenate(self._body(m)).astype(np.int32)
            ids += [self.role[m.role], body]
            scored += [np.array([closes]), np.full(len(body), m.scored)]
            closes = m.scored
        ids.append(self.eos)
        scored.append(np.array([closes]))
        return np.concatenate(ids), np.concatenate(scored)


class ChatEncoder(Encoder):
    """Chat record -> ``{"input_ids": int32[n], "scored": int32[n]}`` of at most ``seq_len`` tokens, or None.

    Bad records (no messages, an unknown role, no scored token, a template that fails) go through the error
    policy like any bad record. A conversation longer than ``seq_len`` is cut after its last assistant
    message that fits (``overlong: truncate``; dropped when no scored token is left) or dropped
    (``overlong: drop``), and counted (:func:`glm5_jax.data.errors.overlong_counts`). ``limit`` conversations
    in a row that are bad or dropped end in one :class:`DataError`.
    """

    def __init__(self, source: str, tokenizer, policy: ErrorPolicy, renderer, seq_len: int,
                 overlong: str = "truncate", limit: int = MAX_CONSECUTIVE_SKIPS):
        super().__init__(source, tokenizer, policy, False, limit)
        self.renderer, self.seq_len, self.overlong = renderer, seq_len, overlong

    def __call__(self, record):
        if isinstance(record, Bad):
            return self._skip(record)
        where, payload = record
        try:
            messages = parse_messages(payload)
            ids, scored = self.renderer.render(messages)
        except ValueError as e:
            return self._skip(Bad(where, str(e)))
        if not scored.any():
            return self._skip(Bad(where, "no scored token (no assistant message with loss)"))
        if len(ids) > self.seq_len:
            ids, scored = self._truncate(messages) if self.overlong == "truncate" else (None, None)
            count_overlong(self.source, "dropped" if ids is None else "truncated")
            if ids is None:
                return self._drop(where)
        with self._lock:
            self._in_a_row = 0
        return {"input_ids": ids, "scored": scored.astype(np.int32)}

    def _truncate(self, messages: list[Message]):
        """The longest prefix ending in an assistant message that fits and scores a token, or (None, None)."""
        for k in range(len(messages) - 1, 0, -1):
            if messages[k - 1].role == "assistant" and any(m.scored for m in messages[:k]):
                ids, scored = self.renderer.render(messages[:k])
                if len(ids) <= self.seq_len:
                    return ids, scored
        return None, None

    def _drop(self, where: str):
        n = self._missed()
        if n >= self.limit:
            raise DataError(f"source {self.source}: {n} conversations in a row do not fit a row of {self.seq_len} "
                            f"tokens (last: {where}); raise seq_len or shorten the conversations")

"""Chat records rendered by a tokenizer's own Jinja chat template, as ``transformers``' ``apply_chat_template``
renders them, with the loss mask derived from rendered prefixes (docs/post-training.md).

The environment is the one ``transformers`` builds: a sandboxed Jinja environment with ``trim_blocks``,
``lstrip_blocks`` and loop controls, a ``tojson`` filter that does not escape HTML (``json.dumps``),
``raise_exception``, ``strftime_now`` and ``namespace``; the template sees ``messages``, ``tools`` (none),
``add_generation_prompt`` and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...).

Mask: for each assistant message ``i`` with loss, the conversation's text from the end of
``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i + 1])`` is scored;
both must be prefixes of the whole rendering (a template that renders earlier turns differently once later
turns exist, e.g. one that drops old reasoning, cannot be masked this way: a bad record). The whole text is
tokenized once; a token is scored when its first character lies in a scored span, and the first token after a
span closes the turn and is scored too (EOS, appended after the text, when nothing follows).
"""

from __future__ import annotations

import datetime
import json
import os

import numpy as np

from glm5_jax.errors import ConfigError

_SPECIALS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def read_template(path: str) -> tuple[str, dict]:
    """(template source, special tokens) from a ``.jinja`` file or a Hugging Face tokenizer folder
    (``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``)."""
    path = os.path.expanduser(os.path.expandvars(path))
    specials, source = {}, None
    folder = path if os.path.isdir(path) else None
    if folder is None:
        if not os.path.isfile(path):
            raise ConfigError(f"template: {path}: no such file or tokenizer folder")
        with open(path, encoding="utf-8") as f:
            source = f.read()
    else:
        config = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                cfg = json.load(f)
            specials = {k: _token_text(cfg[k]) for k in _SPECIALS if isinstance(_token_text(cfg.get(k)), str)}
            source = cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None
        jinja = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                source = f.read()
        if source is None:
            raise ConfigError(f"template: {folder} has no chat_template.jinja and no chat_template in "
                              f"tokenizer_config.json")
    return source, specials


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class TemplateRenderer:
    """Renders messages with a chat template and tokenizes them with an ``hf`` tokenizer (see module doc)."""

    def __init__(self, path: str, tokenizer):
        import jinja2

        self.tokenizer, self.path = tokenizer, path
        source, self.specials = read_template(path)
        try:
            _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"template: {path}: not a valid Jinja template (line {e.lineno}: {e.message})") from None
        self.source = source

    def __getstate__(self):  # the compiled template does not pickle; workers compile their own
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}

    def text(self, messages, add_generation_prompt: bool = False) -> str:
        """The template's text of ``messages`` (dicts as ``apply_chat_template`` takes them)."""
        import jinja2

        compiled = self.__dict__.get("_compiled")
        if compiled is None:
            compiled = self.__dict__["_compiled"] = _environment().from_string(self.source)
        try:
            return compiled.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **self.specials)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template failed to render: {e}") from None

    def render(self, messages) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32[n], scored bool[n]) of a conversation, EOS appended."""
        dicts = [m.as_dict() for m in messages]
        full = self.text(dicts)
        spans = []
        for i, m in enumerate(messages):
            if not m.scored:
                continue
            head, turn = self.text(dicts[:i], add_generation_prompt=True), self.text(dicts[:i + 1])
            for part, what in ((head, "its generation prompt"), (turn, "the conversation up to it")):
                if not full.startswith(part):
                    raise ValueError(f"the chat template renders message {i} differently as {what} than in the "
                                     f"whole conversation, so its tokens cannot be masked")
            spans.append((len(head), len(turn)))
        ids, starts = self.tokenizer.encode_with_offsets(full)
        ids = np.append(ids, np.int32(self.tokenizer.eos_id)).astype(np.int32)
        starts = np.append(starts, len(full))
        scored = np.zeros(len(ids), bool)
        for a, b in spans:
            inside = (starts >= a) & (starts < b)
            scored |= inside
            after = np.flatnonzero(starts >= b)
            if len(after):
                scored[after[0]] = True
        return ids, scored

"""The embedded SFT corpus: conversations about the running Python's standard-library functions.

Built deterministically (no download, same records on every process of a run) from the public functions of
a fixed list of pure-Python standard-library modules (and their classes' public methods), their signatures and their docstrings' first
paragraphs. Function ``k`` (sorted by qualified name) gets conversation shape ``k % 10``:

- 0, 1: the user asks what ``module.func`` does; the assistant answers with the docstring's first paragraph.
- 2: the user asks for the signature; the assistant answers with it.
- 3: as 0, after a system message.
- 4: as 0, with thinking (``reasoning_content``).
- 5, 6: two exchanges (what it does, then its signature).
- 7: two exchanges, the first answer marked ``loss: false`` (context only).
- 8: a tool call (``inspect_signature``), its observation, then the answer.
- 9: as 2, after a system message, with thinking.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings

# Pure-Python modules with documented public functions, present in every CPython build.
MODULES = ("abc", "base64", "bisect", "calendar", "colorsys", "copy", "csv", "difflib", "fnmatch", "fractions",
           "ftplib", "functools", "genericpath", "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html",
           "inspect", "ipaddress", "json", "keyword", "linecache", "locale", "logging", "mimetypes", "netrc",
           "ntpath", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib",
           "posixpath", "pprint", "quopri", "random", "reprlib", "secrets", "shlex", "shutil", "smtplib",
           "socket", "statistics", "string", "tarfile", "tempfile", "textwrap", "threading", "tokenize",
           "traceback", "types", "typing", "urllib.parse", "uuid", "warnings", "weakref", "zipfile")
MAX_ANSWER_CHARS = 320  # first paragraphs are cut at a word boundary so a conversation fits 512 byte tokens
SYSTEM = "You are a concise assistant for Python's standard library."
TOOL = "inspect_signature"


def _first_paragraph(doc: str) -> str:
    text = " ".join(doc.strip().split("\n\n")[0].split())
    if len(text) > MAX_ANSWER_CHARS:
        text = text[:MAX_ANSWER_CHARS].rsplit(" ", 1)[0] + " ..."
    return text


def _functions() -> list[tuple[str, str, str, str]]:
    """(qualified name, module, signature, first paragraph) of every documented public function, sorted."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            for attr, obj in vars(module).items():
                if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                    continue
                if inspect.isfunction(obj):
                    _add(out, name, f"{name}.{attr}", obj)
                elif inspect.isclass(obj):  # the class's own public methods
                    for meth, fn in vars(obj).items():
                        if not meth.startswith("_") and inspect.isfunction(fn):
                            _add(out, name, f"{name}.{attr}.{meth}", fn)
    return [(q, *out[q]) for q in sorted(out)]


def _add(out: dict, module: str, qualname: str, fn) -> None:
    doc = fn.__doc__ and inspect.cleandoc(fn.__doc__)  # its own docstring, not one inherited
    try:
        sig = str(inspect.signature(fn))
    except (TypeError, ValueError):
        return
    if doc and len(sig) < 160:
        out[qualname] = (module, sig, _first_paragraph(doc))


def _ask(q):
    return {"role": "user", "content": f"What does `{q}` do?"}


def _ask_sig(q):
    return {"role": "user", "content": f"What is the signature of `{q}`?"}


def _say(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def _conversation(k: int, q: str, module: str, sig: str, doc: str) -> list[dict]:
    short = q.rsplit(".", 1)[1]
    answer_sig = f"`{short}{sig}`"
    thought = f"`{q}` is defined in the `{module}` module; its docstring says what it does."
    shape = k % 10
    if shape in (0, 1):
        return [_ask(q), _say(doc)]
    if shape == 2:
        return [_ask_sig(q), _say(answer_sig)]
    if shape == 3:
        return [{"role": "system", "content": SYSTEM}, _ask(q), _say(doc)]
    if shape == 4:
        return [_ask(q), _say(doc, reasoning_content=thought)]
    if shape in (5, 6, 7):
        first = _say(doc, **({"loss": False} if shape == 7 else {}))
        return [_ask(q), first, {"role": "user", "content": "And its signature?"}, _say(answer_sig)]
    if shape == 8:
        return [{"role": "user", "content": f"Look up the signature of `{q}`."},
                _say("", tool_calls=[{"name": TOOL, "arguments": {"qualname": q}}]),
                {"role": "observation", "content": f"{short}{sig}"},
                _say(f"The signature is {answer_sig}.")]
    return [{"role": "system", "content": SYSTEM}, _ask_sig(q),
            _say(answer_sig, reasoning_content=f"Read the parameters of `{q}` from its definition.")]


@functools.lru_cache(maxsize=1)
def stdlib_conversations() -> tuple[list[dict], ...]:
    """The corpus's records (lists of messages), in a fixed order."""
    return tuple(_conversation(k, *f) for k, f in enumerate(_functions()))

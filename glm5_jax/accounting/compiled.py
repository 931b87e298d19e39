"""Matmul FLOPs of a compiled program, with every loop counted by its trip count.

XLA's `compiled.cost_analysis()` counts a while loop's body once, whatever its trip count (checked on a jitted
`lax.scan` in tests/test_accounting.py), so for the train step (layer scans, query-block maps, tiled expert loops,
the pipeline's iterations) it sees a fraction of the work. This module walks the optimised HLO text
(`compiled.as_text()`) instead: every computation, every instruction, with the FLOPs of each matrix product
multiplied by the trip counts of the loops around it.

- dot / ragged-dot: 2 x (output elements) x (product of the lhs contracting dimensions); GPU gemm custom
  calls (cuBLAS) likewise, from the dot dimension numbers in their backend config; convolutions as
  2 x (output elements) x (kernel elements / output features).
- while: body x trip count, condition x (trip count + 1). XLA annotates loops whose count it knows
  (`known_trip_count` in the backend config). A loop whose count depends on runtime values has none: its
  count comes from `dynamic_trips(scope)`, keyed by the innermost `glm5_jax.scopes` name the loop was built
  in (its `op_name`), and is 1 (XLA's own convention) when that gives None; each such loop is listed in
  `dynamic`.
- conditional: the most expensive branch (an upper bound); fusions, calls and async wrappers: their called
  computations once per execution.

Every product is attributed to the `glm5_jax.scopes` names its `op_name` carries (`by_scope`: the declared
scopes it ran in, outermost first, `(backward)` where the name stack says `transpose`), and, for reading
only, to the Python function its stack frame names (`by_source`). Elementwise work is not counted (the
analytic count, glm5_jax/accounting/analytic.py, counts matrix products only). Custom calls that are not
matrix products (TopK, ...) are listed in `uncounted`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re

from glm5_jax import scopes

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*)$")
_ARRAY = re.compile(r"[a-z]\w*\[([^\]]*)\]")
_SINGLE_CALLS = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_MULTI_CALLS = re.compile(r"\b(calls|branch_computations|called_computations)=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_FRAME = re.compile(r"\bstack_frame_id=(\d+)")
_OP_NAME = re.compile(r'\bop_name="([^"]*)"')
_GEMM_TARGETS = ("gemm", "matmul")
_NAME = re.compile(r"[\w.]+")
DECLARED = frozenset(v for k, v in vars(scopes).items() if k.isupper() and isinstance(v, str))
UNSCOPED = "(no scope)"


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result type text: `f32[8,32]{1,0}` or a tuple `(s32[], f32[8,32]{1,0})`
    opcode: str
    operands: list[str]  # instruction names
    attrs: str  # everything after the operand list
    frame: int | None  # innermost stack frame id (metadata), None without one
    op_name: str  # the JAX name stack of its metadata ("" without one); `transpose(` marks the backward pass


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instruction]]
    shapes: dict[str, dict[str, str]]  # computation -> instruction name -> result type
    entry: str
    frames: dict[int, tuple[str, str, int]]  # stack frame id -> (file, function, line) of its innermost location


@dataclasses.dataclass
class Count:
    """What `count_flops` found."""

    flops: float = 0.0  # matrix-product FLOPs, every loop at its trip count
    once: float = 0.0  # the same with every loop body counted once (what cost_analysis would see)
    by_scope: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(float))
    by_source: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(float))
    loops: int = 0  # while loops with a known trip count
    dynamic: list = dataclasses.field(default_factory=list)  # loops without one: {scope, source, trips, ...}
    uncounted: dict = dataclasses.field(default_factory=lambda: collections.Counter())  # custom-call targets


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced parentheses in HLO: {text[start:start + 80]!r}")


def _split_top(text: str) -> list[str]:
    """`text` split at the commas outside brackets and braces."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if current:
        parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _instruction(line: str) -> Instruction | None:
    m = _INSTR.match(line)
    if m is None:
        return None
    name, rest = m.group(1), m.group(2)
    if rest.startswith("("):
        end = _balanced(rest, 0)
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if op is None:
        return None
    end = _balanced(rest, op.end() - 1)
    operands = [p.split()[-1].lstrip("%") for p in _split_top(rest[op.end():end - 1])]
    frame, op_name = _FRAME.search(rest, end), _OP_NAME.search(rest, end)
    return Instruction(name, shape, op.group(1), operands, rest[end:], int(frame.group(1)) if frame else None,
                       op_name.group(1) if op_name else "")


def _frames(lines: list[str]) -> dict[int, tuple[str, str, int]]:
    """The stack frame tables XLA prints before the computations: frame -> innermost (file, function, line)."""
    tables, current = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}, None
    for line in lines:
        if line.strip() in tables:
            current = tables[line.strip()]
            continue
        if _HEADER.match(line):
            break
        m = re.match(r"^(\d+)\s+(.*)$", line)
        if current is not None and m:
            current[int(m.group(1))] = m.group(2).strip()
    field = lambda text, key: int(re.search(rf"\b{key}=(\d+)", text).group(1))
    out = {}
    for fid, text in tables["StackFrames"].items():
        loc = tables["FileLocations"].get(field(text, "file_location_id"), "")
        if not loc:
            continue
        file = tables["FileNames"].get(field(loc, "file_name_id"), '""').strip('"')
        func = tables["FunctionNames"].get(field(loc, "function_name_id"), '""').strip('"')
        out[fid] = (file, func, field(loc, "line"))
    return out


def parse(text: str) -> Module:
    """The computations of an HLO module's text (`compiled.as_text()`)."""
    lines = text.splitlines()
    computations, shapes, entry, current = {}, {}, None, None
    for line in lines:
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            computations[current], shapes[current] = [], {}
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        ins = _instruction(line)
        if ins is not None:
            computations[current].append(ins)
            shapes[current][ins.name] = ins.shape
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return Module(computations, shapes, entry, _frames(lines))


def dims(shape: str) -> list[int]:
    """Dimensions of the first array in a result type (`f32[8,<=32]{1,0}` -> [8, 32]; a scalar -> [])."""
    m = _ARRAY.search(shape)
    if m is None or not m.group(1):
        return []
    return [int(d.strip().lstrip("<=")) for d in m.group(1).split(",")]


def _int_list(attrs: str, key: str) -> list[int]:
    m = re.search(rf"\b{key}=\{{([^}}]*)\}}", attrs)
    return [int(v) for v in m.group(1).split(",") if v.strip()] if m else []


def matmul_flops(ins: Instruction, shapes: dict[str, str]) -> float | None:
    """FLOPs of one matrix-product instruction; None for any other instruction."""
    if ins.opcode in ("dot", "ragged-dot"):
        lhs = dims(shapes.get(ins.operands[0], ""))
        contracted = math.prod(lhs[d] for d in _int_list(ins.attrs, "lhs_contracting_dims"))
        return 2.0 * math.prod(dims(ins.shape)) * contracted
    if ins.opcode == "convolution":
        kernel, labels = dims(shapes.get(ins.operands[1], "")), re.search(r"dim_labels=\w+_(\w+)->", ins.attrs)
        out_features = kernel[labels.group(1).index("o")] if labels and kernel else 1
        return 2.0 * math.prod(dims(ins.shape)) * math.prod(kernel) / max(out_features, 1)
    if ins.opcode == "custom-call" and _is_gemm(ins.attrs):
        numbers = _backend_config(ins.attrs).get("gemm_backend_config", {}).get("dot_dimension_numbers", {})
        lhs = dims(shapes.get(ins.operands[0], ""))
        contracted = math.prod(lhs[int(d)] for d in numbers.get("lhs_contracting_dimensions", []))
        return 2.0 * math.prod(dims(ins.shape)) * contracted
    return None


def _target(attrs: str) -> str:
    m = re.search(r'custom_call_target="([^"]+)"', attrs)
    return m.group(1) if m else "?"


def _is_gemm(attrs: str) -> bool:
    target = _target(attrs).lower()
    return any(t in target for t in _GEMM_TARGETS) and "dot_dimension_numbers" in attrs


def _backend_config(attrs: str) -> dict:
    """The JSON backend config of an instruction ({} without one)."""
    at = attrs.find("backend_config=")
    if at < 0:
        return {}
    text = attrs[at + len("backend_config="):]
    try:
        if text.startswith('"'):  # older XLA prints it as a quoted string
            return json.loads(json.JSONDecoder().raw_decode(text)[0])
        return json.JSONDecoder().raw_decode(text)[0]
    except (json.JSONDecodeError, TypeError):
        return {}


def _called(ins: Instruction) -> list[tuple[str, str]]:
    """(role, computation) pairs an instruction calls."""
    out = [(role, name) for role, name in _SINGLE_CALLS.findall(ins.attrs)]
    for role, names in _MULTI_CALLS.findall(ins.attrs):
        out += [(role, n.strip().lstrip("%")) for n in names.split(",") if n.strip()]
    return out


def declared(op_name: str) -> list[str]:
    """The `glm5_jax.scopes` names in a name stack, outermost first (`jit(f)/jvp(glm5.pipeline)/while/body/
    transpose(jvp(glm5.attention))/dot_general` -> [glm5.pipeline, glm5.attention])."""
    out = []
    for name in _NAME.findall(op_name):
        if name in DECLARED and (not out or out[-1] != name):
            out.append(name)
    return out


def scope_key(op_name: str) -> str:
    """`by_scope`'s key of a product: its declared scopes joined by `/` (or UNSCOPED), `(backward)` added
    where the name stack says `transpose`."""
    return "/".join(declared(op_name) or [UNSCOPED]) + (" (backward)" if "transpose(" in op_name else "")


def source(module: Module, frame: int | None, root: str | None = None) -> tuple[str, str]:
    """(file, function) of a stack frame: the file relative to `root` (default: the package's parent)."""
    if frame is None or frame not in module.frames:
        return ("?", "?")
    file, func, _ = module.frames[frame]
    root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if "site-packages/" in file:
        file = file.split("site-packages/", 1)[1]
    elif file.startswith(root):
        file = os.path.relpath(file, root)
    return (file, func)


class _Walker:
    def __init__(self, module: Module, dynamic_trips, count: Count):
        self.m, self.dynamic_trips, self.count = module, dynamic_trips, count
        self._totals: dict[str, float] = {}

    def total(self, comp: str) -> float:
        """Matmul FLOPs of one execution of `comp`, loops at their trip counts (memoised: branch choice)."""
        if comp not in self._totals:
            self._totals[comp] = 0.0  # (a recursion guard; HLO call graphs are acyclic)
            shapes, value = self.m.shapes[comp], 0.0
            for ins in self.m.computations[comp]:
                value += matmul_flops(ins, shapes) or 0.0
                for sub, trips in self._calls(ins, record=False, op_name=ins.op_name):
                    value += trips * self.total(sub)
            self._totals[comp] = value
        return self._totals[comp]

    def _trips(self, ins: Instruction, record: bool, executions: float, op_name: str) -> float:
        m = _TRIPS.search(ins.attrs)
        if m:
            if record:
                self.count.loops += 1
            return float(m.group(1))
        scope = (declared(op_name) or [None])[-1]
        trips = self.dynamic_trips(scope)
        if record:
            self.count.dynamic.append({"scope": scope, "source": ":".join(source(self.m, ins.frame)),
                                       "trips": trips, "executions": executions})
        return 1.0 if trips is None else float(trips)

    def _calls(self, ins: Instruction, record: bool, executions: float = 1.0, op_name: str = "") -> list:
        """(computation, executions per execution of `ins`) of what `ins` calls."""
        called = [(r, c) for r, c in _called(ins) if c in self.m.computations]
        if ins.opcode == "while":
            trips = self._trips(ins, record, executions, ins.op_name or op_name)
            return [(c, trips + 1 if r == "condition" else trips) for r, c in called]
        if ins.opcode == "conditional":
            branches = [c for _, c in called]
            return [(max(branches, key=self.total), 1.0)] if branches else []
        if ins.opcode == "custom-call" and record and not _is_gemm(ins.attrs):
            self.count.uncounted[_target(ins.attrs)] += 1
        return [(c, 1.0) for _, c in called]

    def visit(self, comp: str, executions: float, once: float, frame: int | None = None, op_name: str = ""):
        """Add `comp`'s FLOPs run `executions` times (`once`: its executions with loop bodies counted once).
        Instructions without metadata (those inside fusions) take their caller's `frame` and `op_name`."""
        shapes = self.m.shapes[comp]
        for ins in self.m.computations[comp]:
            where, name = ins.frame or frame, ins.op_name or op_name
            flops = matmul_flops(ins, shapes)
            if flops:
                self.count.flops += flops * executions
                self.count.once += flops * once
                backward = " (backward)" if "transpose(" in name else ""
                self.count.by_scope[scope_key(name)] += flops * executions
                self.count.by_source[":".join(source(self.m, where)) + backward] += flops * executions
            for sub, trips in self._calls(ins, record=True, executions=executions, op_name=name):
                self.visit(sub, executions * trips, once, where, name)


def count_flops(text: str, dynamic_trips=lambda where: None) -> Count:
    """Matmul FLOPs of the HLO module `text` (one device's program), loops at their trip counts.

    `dynamic_trips(scope)`: the mean trip count of a loop without a known one, given the innermost
    `glm5_jax.scopes` name it was built in (None without one); None: count its body once and list it in
    `Count.dynamic` with trips None.
    """
    module = parse(text)
    count = Count()
    _Walker(module, dynamic_trips, count).visit(module.entry, 1.0, 1.0)
    count.by_scope = dict(sorted(count.by_scope.items(), key=lambda kv: -kv[1]))
    count.by_source = dict(sorted(count.by_source.items(), key=lambda kv: -kv[1]))
    count.uncounted = dict(count.uncounted)
    return count

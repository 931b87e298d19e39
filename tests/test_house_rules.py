"""The seams of the codebase, checked statically: imports point one way, files stay small, one override
function and one error family exist. (Reads the source; imports nothing from the package.)"""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = {"glm5_jax": ROOT / "glm5_jax", "glm5_jax.sharding": ROOT / "sharding", "glm5_jax.data": ROOT / "data"}
MAX_LINES = 450


def _sources():
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            if package == "glm5_jax" and path.relative_to(folder).parts[0] in ("sharding", "data"):
                continue
            module = ".".join((package, *path.relative_to(folder).with_suffix("").parts))
            yield module.removesuffix(".__init__"), path


def _imports(module: str, path: pathlib.Path) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved), at any depth."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _importers(prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} imports {name}" for m, path in _sources() if m.startswith(prefix)
                  for name in _imports(m, path) if name.startswith(forbidden))


def test_imports_point_one_way():
    assert _importers("glm5_jax.sharding", ("glm5_jax.model",)) == []
    assert _importers("glm5_jax.optim", ("glm5_jax.model", "glm5_jax.checkpoint", "glm5_jax.train")) == []
    assert _importers("glm5_jax.train", ("glm5_jax.plan", "glm5_jax.cli", "glm5_jax.plan_command")) == []
    assert _importers("glm5_jax.model", ("glm5_jax.train", "glm5_jax.plan", "glm5_jax.checkpoint")) == []


def test_files_stay_small():
    long = [f"{path.relative_to(ROOT)}: {n} lines" for _, path in _sources()
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert long == []


def test_one_override_function_and_one_error_family():
    defs, errors = [], []
    for module, path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and "override" in node.name and node.name != "model_overrides":
                defs.append(f"{module}.{node.name}")
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", "").endswith(("Error", "Exception"))
                                                      for b in node.bases):
                errors.append(f"{module}.{node.name}")
    assert defs == ["glm5_jax.values.apply_overrides"]
    # Every user-facing error lives in glm5_jax.errors; the only other one is the trainer's internal signal.
    assert [e for e in errors if not e.startswith("glm5_jax.errors.")] == ["glm5_jax.train.trainer.CompileInterrupted"]


ATTRIBUTION = ("glm5_jax/accounting/loops.py", "glm5_jax/accounting/parts.py",
               "glm5_jax/bench/summary.py")


def _matched_strings(tree) -> list[str]:
    """The string constants a module matches names against: operands of comparisons (`==`, `in`) and
    arguments of `startswith` / `endswith`."""
    out = []
    for node in ast.walk(tree):
        operands = []
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("startswith", "endswith"):
            operands = node.args
        for op in operands:
            for sub in ast.walk(op):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    out.append(sub.value)
    return out


def test_accounting_by_scope_names_never_by_function_names():
    """Compiled FLOPs and loop trip counts are attributed by the `glm5_jax.scopes` names only. No attribution
    module matches a string naming a source file or a function or class of the traced code (`_accumulate`,
    `scan_layers`, `SwiGLU`: a rename would silently move figures), none reads the by-function table, and
    the parts it keys on are `scopes` constants."""
    traced = ("glm5_jax.model", "glm5_jax.sharding", "glm5_jax.optim", "glm5_jax.train")
    defined = {node.name for module, path in _sources() if module.startswith(traced)
               for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    names = {n for n in defined if not (n.isalpha() and n.islower())}  # identifiers, not words such as `step`
    found = []
    for rel in ATTRIBUTION:
        text = (ROOT / rel).read_text()
        found += [f"{rel}: {s!r}" for s in _matched_strings(ast.parse(text))
                  if set(re.findall(r"[A-Za-z_]\w*", s)) & names or ".py" in s]
        found += [f"{rel} reads by_source"] if re.search(r"\bby_source\b", text) else []
    assert found == []
    parts = ast.parse((ROOT / "glm5_jax/accounting/parts.py").read_text())
    table = next(n.value for n in parts.body if isinstance(n, ast.Assign) and n.targets[0].id == "PARTS")
    keys = [k for row in table.elts for k in row.elts[1].elts]
    assert keys and all(isinstance(k, ast.Attribute) and k.value.id == "scopes" for k in keys)
    assert _importers("glm5_jax.scopes", ("glm5_jax",)) == []


def test_one_accounting_package():
    assert not (ROOT / "glm5_jax/model/flops.py").exists() and not (ROOT / "glm5_jax/bench/hlo_flops.py").exists()
    for package in ("glm5_jax.model", "glm5_jax.sharding", "glm5_jax.optim"):
        assert _importers(package, ("glm5_jax.accounting",)) == []

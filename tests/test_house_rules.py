"""The seams of the codebase, checked statically: imports point one way, files stay small, one override
function and one error family exist, the command line is a dispatcher over the packages' command modules.
(Reads the source; imports nothing from the package, but for one child process that builds the parser.)"""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

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
    assert _importers("glm5_jax.train", ("glm5_jax.plan", "glm5_jax.cli")) == []
    assert _importers("glm5_jax.model", ("glm5_jax.train", "glm5_jax.plan", "glm5_jax.checkpoint")) == []
    assert _importers("glm5_jax.rl", ("glm5_jax.plan", "glm5_jax.cli", "glm5_jax.bench")) == []
    assert _importers("glm5_jax.rl._sandbox_child", ("glm5_jax",)) == []  # (untrusted code's process: stdlib only)


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


def _is_command(module: str) -> bool:
    return module.rsplit(".", 1)[-1] == "command"


def test_cli_is_a_dispatcher_and_each_command_module_registers_its_subcommands():
    cli = ROOT / "glm5_jax" / "cli.py"
    assert len(cli.read_text().splitlines()) < 150
    tree = ast.parse(cli.read_text())
    # No subcommand is built or run in cli.py: no add_parser / set_defaults, no function besides the dispatch.
    calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert not calls & {"add_parser", "set_defaults"}
    assert {n.name for n in tree.body if isinstance(n, ast.FunctionDef)} == {
        "build_parser", "_exit_stopped", "_stop", "_run", "main"}
    commands = {m: path for m, path in _sources() if _is_command(m)}
    assert {name for name in _imports("glm5_jax.cli", cli) if _is_command(name)} == set(commands)
    for module, path in commands.items():
        defs = {n.name: n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert "register" in defs and [a.arg for a in defs["register"].args.args] == ["sub"], module
        source = ast.get_source_segment(path.read_text(), defs["register"])
        assert "add_parser(" in source and "set_defaults(run=" in source, module


def test_only_the_cli_imports_a_command_module():
    assert sorted(f"{m} imports {name}" for m, path in _sources() if m != "glm5_jax.cli"
                  for name in _imports(m, path) if _is_command(name) and name != m) == []


def test_building_the_command_line_imports_no_jax():
    code = ("import sys; from glm5_jax import cli; cli.build_parser(); "
            "print([m for m in ('jax', 'flax', 'orbax.checkpoint', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_one_step_builder():
    """A train step is made in one place (`glm5_jax.train.step.make_step`, which `build_step` calls for a resolved
    stage): no other module, test or benchmark constructs `TrainStep` or `EvalStep` itself."""
    made = []
    for path in sorted([*ROOT.glob("glm5_jax/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and (getattr(node.func, "id", None) or getattr(node.func, "attr", None)) in (
                    "TrainStep", "EvalStep"):
                made.append(str(path.relative_to(ROOT)))
    assert made == ["glm5_jax/train/step.py"]


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


def test_lower_layers_know_nothing_above_them():
    """The losses know no recipe, the checkpoint code no data format, the step no data loader, decoding no
    training step."""
    assert _importers("glm5_jax.train.losses", ("glm5_jax.train.recipe",)) == []
    assert _importers("glm5_jax.train.step", ("glm5_jax.data",)) == []
    assert _importers("glm5_jax.checkpoint", ("glm5_jax.data", "glm5_jax.train")) == []
    assert _importers("glm5_jax.generate", ("glm5_jax.train", "glm5_jax.rl")) == []

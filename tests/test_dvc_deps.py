"""Every project file a DVC stage's code loads is one of that stage's deps, so editing it invalidates the
stage (`dvc repro` never calls stale outputs "up to date").

A stage's code is its function in its stages module (the default pipeline's pipelines/data_stages.py,
model_stages.py or serve_stages.py, as pipelines/stages.py maps them; the detection pipeline's detect_stages.py),
the module's own helpers it calls, the module's top-level imports, and every project module those
import, transitively (each module's imports at any level, a superset of what one run may load). The
`resops run` dispatcher (pipelines/cli.py) is the runner, not stage code.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "pipelines")
PIPELINES = {"default": ROOT / "dvc.yaml", "detect": ROOT / "pipelines/detect/dvc.yaml"}


def stages_module(pipeline: str, stage: str) -> Path:
    """The module that defines a stage's function."""
    if pipeline == "detect":
        return ROOT / "pipelines/detect_stages.py"
    from pipelines.stages import STAGE_MODULES

    assert stage in STAGE_MODULES, f"pipelines/stages.py does not map the dvc.yaml stage {stage}"
    return ROOT / "pipelines" / f"{STAGE_MODULES[stage]}.py"


def module_file(name: str) -> Path | None:
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.exists():
            return f
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(tree: ast.AST, current: str) -> set[str]:
    """Project modules an AST imports (``from a.b import c`` adds ``a.b.c`` when that is a module)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                pkg = current.split(".")[:len(current.split(".")) - node.level + (current.endswith("__init__"))]
                base = ".".join([*pkg, base] if base else pkg)
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}")}
    return {m for m in out if module_file(m)}


def closure(modules: set[str]) -> set[Path]:
    """The files of ``modules``, their parent packages' __init__ files, and what they import, transitively."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            f = module_file(".".join(parts[:i]))
            if f is None or f in seen:
                continue
            seen.add(f)
            todo.extend(imported_modules(ast.parse(f.read_text()), _module_name(f)))
    return seen


def stage_files(stages_module: Path, stage: str) -> set[Path]:
    tree = ast.parse(stages_module.read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert stage in functions, f"{stages_module.name} has no stage function {stage}"
    body, todo = [], [stage]
    while todo:
        fn = functions[todo.pop()]
        if fn in body:
            continue
        body.append(fn)
        todo += [n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id in functions]
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    name = _module_name(stages_module)
    mods = set().union(*(imported_modules(node, name) for node in [*body, *top]))
    return {stages_module, *closure(mods)}


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in deps)


def _cases():
    for pipeline, dvc_yaml in PIPELINES.items():
        for stage in yaml.safe_load(dvc_yaml.read_text())["stages"]:
            yield pytest.param(pipeline, stage, id=f"{pipeline}-{stage}")


@pytest.mark.parametrize("pipeline,stage", list(_cases()))
def test_every_file_a_stage_loads_is_one_of_its_deps(pipeline, stage):
    dvc_yaml = PIPELINES[pipeline]
    spec = yaml.safe_load(dvc_yaml.read_text())["stages"][stage]
    deps = [(dvc_yaml.parent / d).resolve() for d in spec.get("deps", [])]
    files = stage_files(stages_module(pipeline, stage), stage)
    missing = sorted(str(f.relative_to(ROOT)) for f in files if not covered(f, deps))
    assert not missing, f"{dvc_yaml.relative_to(ROOT)} stage {stage} loads files its deps do not list: {missing}"


def test_the_check_sees_a_removed_dep(tmp_path):
    """Without `components/rebalance` in its deps the gan stage fails the check above."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["gan"]
    deps = [(ROOT / d).resolve() for d in spec["deps"] if d != "components/rebalance"]
    files = stage_files(ROOT / "pipelines/data_stages.py", "gan")
    assert [f for f in files if not covered(f, deps)], "removing a dep went unnoticed"

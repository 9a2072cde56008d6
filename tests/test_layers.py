"""The architecture of ``commhooks/``: four layers, and components that never import each other.

    level 1  commhooks/base/        primitives (flat weights, communication, checks, hooks, fields)
    level 2  commhooks/ops/         shared operations and schedules, the component contract
    level 3  commhooks/components/  one step wrapper per module, with its typed config
    level 4  commhooks/*.py         algorithm, optimizer wrapper, registry, built-ins, build

A module imports only its own level or lower ones (levels 1 and 2 also from their own level;
a component from no other component), and ``commhooks`` imports nothing of ``launch``,
``recipes``, ``benchmarks`` or ``tests``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "commhooks"
LEVELS = {"base": 1, "ops": 2, "components": 3}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def level(module: str) -> int:
    parts = module.split(".")
    return LEVELS.get(parts[1], 4) if len(parts) > 1 else 4


def internal_imports(path: Path, me: str | None = None) -> set[str]:
    """The modules of this repository ``path`` (module ``me``) imports, relative imports resolved."""
    me = me or module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            candidates = [n for n in names if (PACKAGE.parent / n.replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE.parent / n.replace(".", "/") / "__init__.py").exists()]
            out.update(candidates or [target])
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in ("commhooks", "launch", "recipes", "benchmarks", "tests")}


def graph() -> dict[str, set[str]]:
    return {module_name(p): internal_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_commhooks_imports_nothing_above_it():
    for module, imports in graph().items():
        foreign = {m for m in imports if not m.startswith("commhooks")}
        assert not foreign, f"{module} imports {foreign}"


def test_every_import_goes_to_the_same_level_or_below():
    for module, imports in graph().items():
        if module.endswith("__init__") or module == "commhooks":
            continue
        for target in imports:
            assert level(target) <= level(module), f"{module} (level {level(module)}) imports {target} (level {level(target)})"


def test_no_component_imports_another():
    for module, imports in graph().items():
        if level(module) == 3 and not module.endswith("components"):
            others = {t for t in imports if level(t) == 3 and t != module}
            assert not others, f"{module} imports the components {others}"


def test_the_checker_sees_a_violation(tmp_path):
    # A layering test that cannot fail is worse than none: the resolver must see a component
    # importing another one, and a primitive importing upwards.
    probe = tmp_path / "probe.py"
    probe.write_text("from .gossip import GossipMixing\nfrom ..algorithm import Algorithm\nimport recipes.cli\n")
    imports = internal_imports(probe, me="commhooks.components.probe")
    assert imports == {"commhooks.components.gossip", "commhooks.algorithm", "recipes.cli"}
    assert level("commhooks.components.gossip") == 3 and level("commhooks.algorithm") == 4


def test_four_levels_and_the_package_layout():
    levels = {level(m) for m in graph()}
    assert levels == {1, 2, 3, 4}
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(LEVELS)

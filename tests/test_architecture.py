"""docs/architecture.md against the code: every module and name it points to exists, its example
strategy registers and builds, and cache/ imports no model code."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"


def _table_rows() -> list[tuple[str, list[str]]]:
    """(module cell, backticked names in the 'what it holds' cell) of the 'Where each idea lives' table."""
    section = DOC.read_text().split("## Where each idea lives")[1].split("##")[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`"):
            rows.append((cells[1], re.findall(r"`([A-Za-z_][A-Za-z_0-9]*)`", cells[2])))
    return rows


def test_every_module_and_name_in_the_table_exists():
    rows = _table_rows()
    assert len(rows) >= 18
    for modules, names in rows:
        found = []
        for path in re.findall(r"`([a-z_/]+\.py)`", modules):
            path = path if path.startswith("pkdpipe") else f"pkdpipe/{path}"
            assert (REPO / path).is_file(), path
            found.append(importlib.import_module(path.removesuffix(".py").replace("/", ".")))
        for name in names:
            assert any(hasattr(module, name) for module in found), f"{name} in {modules}"


def test_the_example_strategy_registers_and_builds():
    from pkdpipe import strategies

    block = re.search(r"```python\n(.*?)```", DOC.read_text(), flags=re.S).group(1)
    namespace: dict = {}
    try:
        exec(compile(block.replace("...", "return {}"), str(DOC), "exec"), namespace)
        from pkdpipe.config import DistillConfig, sweep_fields

        mine = strategies.get("mine")
        assert mine.terms == ("loss", "ce", "my_term") and mine.layer_map(6, 3) == [4, 5]
        config = DistillConfig(strategy="mine", my_weight=0.3)  # its setting, as the CLI passes it
        assert (
            config.my_weight == 0.3
            and "my_weight" in sweep_fields()
            and mine.hyperparameters == ("my_weight",)
        )
        assert callable(mine.make_step(strategies.StepSpec(config, False, [4, 5], [1, 2])))
    finally:
        strategies._REGISTRY.pop("mine", None)


@pytest.mark.parametrize(
    "module", ["builder", "reader", "writer", "verify", "local", "store", "manifest", "schema", "stats"]
)
def test_the_cache_package_imports_no_model_code(module):
    code = (
        f"import sys, pkdpipe.cache.{module}; "
        "print(sorted(m for m in ('transformers', 'pkdpipe.models') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _import_graph() -> dict[str, set[str]]:
    """pkdpipe's modules and the pkdpipe modules each imports, at any depth of its code (an import
    inside a function, made to dodge a circle, counts as much as one at the top)."""
    import ast

    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (REPO / "pkdpipe").rglob("*.py")}  # fmt: skip
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pkdpipe"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                         for a in node.names}  # fmt: skip
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("pkdpipe.")}
        graph[name] = {d for d in deps if d in files and d not in (name, "pkdpipe")}
    return graph


def test_the_import_graph_has_no_circle():
    """Every module can be read bottom-up: none imports, even lazily, a module that imports it back."""
    graph = _import_graph()
    assert len(graph) > 30
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import circle: " + " -> ".join(path[path.index(module) :] + [module]))
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_functions_stay_short():
    """No function in pkdpipe/ or cli/ over 90 lines: a longer one does several things."""
    import ast

    long = []
    for path in [*(REPO / "pkdpipe").rglob("*.py"), *(REPO / "cli").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if function and node.end_lineno - node.lineno + 1 > 90:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert long == [], long


def test_the_teacher_pass_writes_the_cache_only_through_the_builder():
    """teacher.py holds the model side; the folder, the shards and the manifest are the builder's
    (docs/architecture.md counts what a new cache field touches on that basis)."""
    graph = _import_graph()
    cache = {
        m.removeprefix("pkdpipe.cache.") for m in graph["pkdpipe.teacher"] if m.startswith("pkdpipe.cache.")
    }
    assert cache == {"builder", "manifest", "fingerprint", "reader"}, cache

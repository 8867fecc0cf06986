"""docs/architecture.md against the code: every module and name it points to exists, its example
strategy registers and builds, and cache/ imports no model code."""

from __future__ import annotations

import ast
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


# -- the "Layers" section: no module imports from a layer above its own ---------------------------
def _layers() -> dict[str, int]:
    """{module: its layer's rank} from docs/architecture.md's Layers table: listed modules (`cache/`
    standing for every module of the package), and "every other module" for the rest."""
    section = DOC.read_text().split("## Layers")[1].split("\n## ")[0]
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| layer")
    ]
    graph = _import_graph()
    rank, rest = {}, None
    for i, (_, modules, _) in enumerate(rows):
        if "every other module" in modules:
            rest = i
        for name in re.findall(r"`([a-z_/]+)`", modules):
            if name.endswith("/"):
                rank.update({m: i for m in graph if m.startswith(f"pkdpipe.{name[:-1]}")})
            else:
                assert f"pkdpipe.{name}" in graph, f"the Layers table names {name}, which is not a module"
                rank[f"pkdpipe.{name}"] = i
    assert rest is not None and len(rows) >= 4
    return {m: rank.get(m, rest) for m in graph if m not in ("pkdpipe", "pkdpipe.__main__")}


def test_no_module_imports_from_a_layer_above_its_own():
    layer, graph = _layers(), _import_graph()
    upward = _upward_imports(layer, graph)
    assert upward == [], "upward imports (docs/architecture.md, Layers): " + ", ".join(upward)


def _upward_imports(layer: dict[str, int], graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} -> {d}" for m, deps in graph.items() if m in layer for d in deps if layer.get(d, 0) > layer[m]
    )


# -- the "Measured" table: its "now" column is what the code gives ---------------------------------
def _measured() -> dict[str, str]:
    """{measure: its 'now' cell} of docs/architecture.md's Measured table."""
    section = DOC.read_text().split("## Measured")[1].split("\n## ")[0]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()]
    return {row[0]: row[-1] for row in cells if len(row) == 3 and row[0] not in ("measure", "---")}


def _functions() -> list[tuple[str, str, ast.AST]]:
    """(file, name, node) of every function in pkdpipe/ and cli/."""
    found = []
    for path in sorted([*(REPO / "pkdpipe").rglob("*.py"), *(REPO / "cli").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((str(path.relative_to(REPO)), node.name, node))
    return found


def _complexity(function: ast.AST) -> int:
    """Cyclomatic complexity, counted as 1 + each branch: if/elif, for, while, except, a
    conditional expression, a comprehension's for and its ifs, each and/or (nested functions in)."""
    count = 1
    for node in ast.walk(function):
        if isinstance(node, (ast.If, ast.For, ast.AsyncFor, ast.While, ast.ExceptHandler, ast.IfExp)):
            count += 1
        elif isinstance(node, ast.comprehension):
            count += 1 + len(node.ifs)
        elif isinstance(node, ast.BoolOp):
            count += len(node.values) - 1
    return count


def _lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def _circles(graph: dict[str, set[str]]) -> int:
    """How many groups of modules import each other round a circle (strongly connected, 2 or more)."""
    reach = {m: set() for m in graph}
    for start in graph:
        todo = list(graph[start])
        while todo:
            m = todo.pop()
            if m not in reach[start]:
                reach[start].add(m)
                todo += graph[m]
    groups = {
        frozenset(n for n in graph if n in reach[m] and m in reach[n]) | {m} for m in graph if m in reach[m]
    }
    return len(groups)


def _files_naming(names: set[str]) -> list[str]:
    """The files of pkdpipe/ and cli/ whose code uses one of `names` as a name, an attribute or a
    string (docstrings and comments aside)."""
    found = []
    for path in sorted([*(REPO / "pkdpipe").rglob("*.py"), *(REPO / "cli").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            used = (
                node.id if isinstance(node, ast.Name)
                else node.attr if isinstance(node, ast.Attribute)
                else node.value if isinstance(node, ast.Constant) and isinstance(node.value, str)
                else node.name if isinstance(node, ast.alias)
                else None
            )  # fmt: skip
            if used in names:
                found.append(str(path.relative_to(REPO)))
                break
    return found


def _renaming_modules() -> list[str]:
    """The modules besides files.py that move a file or folder into place themselves (os.replace,
    os.rename, Path.replace / rename with a path)."""
    found = []
    for path in sorted((REPO / "pkdpipe").rglob("*.py")):
        if path.name == "files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            if not call or node.func.attr not in ("replace", "rename"):
                continue
            by_os = isinstance(node.func.value, ast.Name) and node.func.value.id == "os"
            one_path = len(node.args) == 1 and not node.keywords  # str.replace takes two
            if by_os or one_path and not isinstance(node.args[0], ast.Constant):
                found.append(str(path.relative_to(REPO / "pkdpipe")))
                break
    return found


def _locking_modules() -> list[str]:
    return [
        str(p.relative_to(REPO / "pkdpipe"))
        for p in sorted((REPO / "pkdpipe").rglob("*.py"))
        if "fcntl" in p.read_text() and p.name != "files.py"
    ]


def _now() -> dict[str, str]:
    """Each measure of the Measured table as the code gives it today, worded as the table words it."""
    graph = _import_graph()
    most = max(_lines(node) for *_, node in _functions())
    longest = ", ".join(
        f"`{name}` ({file}, complexity {_complexity(node)})"
        for file, name, node in _functions()
        if _lines(node) == most
    )
    plugin = REPO / "tests" / "plugins" / "my_strategy.py"
    plugin_names = {"MineSettings", "mine_step", "my_setting", "my_sharpness"}  # its name "mine" is a word
    assert all(n in plugin.read_text() for n in plugin_names)
    over = [f"{f}: {n}" for f, n, node in _functions() if _lines(node) > 90]
    renames, locks = _renaming_modules(), _locking_modules()
    field = _files_naming({"LOGITS"})
    return {
        "import circles": str(_circles(graph)),
        "upward imports (see Layers)": str(len(_upward_imports(_layers(), graph))),
        "longest function": f"{most} lines: {longest}",
        "functions over 90 lines": str(len(over)),
        "pkdpipe files a new strategy touches": f"{len(_files_naming(plugin_names))} ({plugin.name})",
        "files that name a per-row cache dataset (`schema.LOGITS`)": (
            f"{len(field)}: "
            + ", ".join(f"`{f.removeprefix('pkdpipe/')}`" for f in field)
            + "; and the format page"
        ),
        "modules that move files into place / take locks, `files.py` aside": (
            f"{len(renames)} ({', '.join(f'`{r}`' for r in renames)}) / {len(locks)}"
        ),
    }


def test_the_measured_table_is_what_the_code_gives():
    """docs/architecture.md's Measured figures, computed from the code: when the code moves, this
    fails with the row as it reads now, to paste into the page."""
    doc, now = _measured(), _now()
    assert set(doc) == set(now), f"the table's measures {sorted(doc)} are not the computed {sorted(now)}"
    stale = [f"| {k} | ... | {v} |" for k, v in now.items() if doc[k] != v]
    assert stale == [], "stale in docs/architecture.md's Measured table, now:\n" + "\n".join(stale)


# -- the run folder's files, named once (pkdpipe/runfolder.py) -------------------------------------
def test_each_run_file_and_the_cache_manifest_is_spelled_once():
    """Every file name a run folder or a cache holds is written out in one module only: code
    elsewhere names it through that module's constant (messages and help may name it in prose)."""
    from pkdpipe import runfolder
    from pkdpipe.cache import manifest

    names = {v for k, v in vars(runfolder).items() if k.isupper() and isinstance(v, str) and "." in v}
    assert {"metrics.json", "pkdpipe_config.json", "pkdpipe_finetune.json", "train_log.jsonl"} <= names
    names.add(manifest.MANIFEST)
    spelled: dict[str, list[str]] = {name: [] for name in names}
    for path in sorted([*(REPO / "pkdpipe").rglob("*.py"), *(REPO / "cli").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in spelled:
                spelled[node.value].append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert {k: v for k, v in spelled.items() if len(v) != 1} == {}

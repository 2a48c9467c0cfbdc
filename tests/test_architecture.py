"""The project's structural rules, checked statically from the source with ``ast`` (nothing is imported, jax
included).

Every ``.py`` file under the scanned packages is parsed, its imports are resolved to project modules, and each
rule in the tables below is one test. A failing rule lists each violation as ``path:line: what``, so a failing
run is a to-do list. The rules are data: edit the tables, not the checker.

Imports are counted wherever they are (module level, in functions, in classes), except under
``if TYPE_CHECKING:``, which holds annotations only and is ignored by every rule. An import of ``a.b.c`` is an
edge to the deepest project module among ``a.b.c``, ``a.b``, ``a``; ``from pkg import name`` is an edge to
``pkg.name`` where that is a module, else to ``pkg``. For cycles, importing a module also runs the
``__init__`` of each package above it, so each such package is an (implied) edge too, unless the importer is
inside that package (where the package is already being imported).
"""

from __future__ import annotations

import ast
import re
import sys
from collections import deque
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# The rules, as data.
# ----------------------------------------------------------------------------------------------------------

# The top-level packages scanned (each a folder under the repository root); their modules are the "project
# modules". Relative imports and imports of these names are project imports.
PROJECT_PACKAGES = ("dsv3_jax", "pallas_kernels")

# The scan must find at least this many modules, so that no rule passes on an empty or misplaced scan.
MIN_MODULES = 20


@dataclass(frozen=True)
class Direction:
    """Modules matching a prefix in ``sources`` import no project module matching a prefix in ``forbidden``,
    except the modules listed (exactly) in ``allowed``. Prefixes match whole dotted components
    (``dsv3_jax.hf`` matches ``dsv3_jax.hf`` and ``dsv3_jax.hf.x``, not ``dsv3_jax.hf_config``). Imports
    between two modules that both match ``sources`` are never a violation."""

    name: str
    sources: tuple[str, ...]
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()


_ABOVE_MODEL = ("dsv3_jax.train", "dsv3_jax.infer", "dsv3_jax.hf", "dsv3_jax.export", "dsv3_jax.costmodel",
                "dsv3_jax.plan")

DIRECTIONS = (
    Direction("pallas_kernels", sources=("pallas_kernels",), forbidden=("dsv3_jax",)),
    Direction("config", sources=("dsv3_jax.config",), forbidden=("dsv3_jax",), allowed=("dsv3_jax",)),
    Direction("parallel", sources=("dsv3_jax.parallel",),
              forbidden=("dsv3_jax.layers", "dsv3_jax.model", "dsv3_jax.ops", "dsv3_jax.runtime",
                         "dsv3_jax.hf_config") + _ABOVE_MODEL),
    Direction("ops", sources=("dsv3_jax.ops",),
              forbidden=("dsv3_jax.layers", "dsv3_jax.model", "dsv3_jax.runtime") + _ABOVE_MODEL),
    Direction("layers", sources=("dsv3_jax.layers",), forbidden=("dsv3_jax.model",) + _ABOVE_MODEL),
    Direction("model", sources=("dsv3_jax.model",), forbidden=_ABOVE_MODEL),
    Direction("train-not-infer", sources=("dsv3_jax.train",), forbidden=("dsv3_jax.infer",)),
    Direction("infer-not-train", sources=("dsv3_jax.infer",), forbidden=("dsv3_jax.train",)),
)

# Function-level imports are allowed only of optional dependencies: top-level packages that are neither
# project packages, nor required (setup.py's install_requires), nor in the standard library. Distribution
# name -> import name, where it is not the distribution name lowercased with "-" -> "_":
DIST_TO_IMPORT = {
    "orbax-checkpoint": "orbax",
    "absl-py": "absl",
    "ml_dtypes": "ml_dtypes",
    "tensorboardX": "tensorboardX",
}

# No function (or method, or nested function) longer than this, counted from ``def`` to its last line.
MAX_FUNCTION_LINES = 100

# No platform named in the modules matching these prefixes: no string constant equal (case-insensitive) to a
# platform name, no reference to a platform query.
PLATFORM_FREE = ("dsv3_jax.layers", "dsv3_jax.model")
PLATFORM_STRINGS = frozenset({"cpu", "gpu", "tpu", "cuda", "rocm", "mosaic_gpu", "triton", "interpret"})
PLATFORM_NAMES = frozenset({"default_backend"})  # as a name, an attribute or an imported name
PLATFORM_QUALIFIED = frozenset({"jax.devices", "jax.local_devices"})  # as ``jax.x`` or ``from jax import x``
PLATFORM_ATTRIBUTES = frozenset({"platform"})  # as an attribute, ``x.platform``


# ----------------------------------------------------------------------------------------------------------
# The scan.
# ----------------------------------------------------------------------------------------------------------


def _within(name: str, prefix: str) -> bool:
    """Whether dotted ``name`` is ``prefix`` or below it (whole components)."""
    return name == prefix or name.startswith(prefix + ".")


def _within_any(name: str, prefixes) -> bool:
    return any(_within(name, p) for p in prefixes)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    lineno: int
    text: str  # the statement, as source
    top: str  # the top-level package imported ("" for a relative import beyond the top-level package)
    function: str | None  # qualified name of the innermost enclosing function; None outside functions
    targets: tuple[str, ...]  # the project modules imported directly


@dataclass(frozen=True)
class Function:
    qualname: str
    lineno: int
    end_lineno: int


@dataclass
class Module:
    name: str
    path: str  # relative to the root, posix
    is_package: bool
    tree: ast.Module
    imports: list[Import] = field(default_factory=list)
    functions: list[Function] = field(default_factory=list)


@dataclass
class Project:
    root: Path
    packages: tuple[str, ...]
    modules: dict[str, Module]
    required: frozenset[str]  # import names of the required dependencies

    @property
    def imports(self):
        return [imp for mod in self.modules.values() for imp in mod.imports]

    def where(self, imp: Import) -> str:
        return f"{self.modules[imp.module].path}:{imp.lineno}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Visitor(ast.NodeVisitor):
    """Collects a module's imports (outside ``if TYPE_CHECKING:``) and functions, with their scopes."""

    def __init__(self, mod: Module, modules: dict[str, Module]):
        self.mod, self.modules = mod, modules
        self.scope: list[str] = []  # enclosing class and function names
        self.function: str | None = None  # qualified name of the innermost enclosing function
        self.type_checking = False

    def _deepest(self, name: str | None) -> str | None:
        parts = name.split(".") if name else []
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in self.modules:
                return ".".join(parts[:i])
        return None

    def _absolute(self, node: ast.ImportFrom) -> str | None:
        if node.level == 0:
            return node.module
        package = self.mod.name if self.mod.is_package else self.mod.name.rpartition(".")[0]
        parts = package.split(".")
        if node.level - 1 >= len(parts):
            return None  # beyond the top-level package
        return ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))

    def _record(self, node: ast.stmt, top: str, targets) -> None:
        if self.type_checking:
            return
        targets = tuple(dict.fromkeys(t for t in targets if t is not None and t != self.mod.name))
        self.mod.imports.append(Import(self.mod.name, node.lineno, ast.unparse(node), top, self.function, targets))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:  # one record per name: `import json, torch` may be half allowed
            self._record(node, alias.name.split(".")[0], [self._deepest(alias.name)])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._absolute(node)
        if base is None:
            self._record(node, "", [])
            return
        targets = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            targets.append(sub if alias.name != "*" and sub in self.modules else self._deepest(base))
        self._record(node, base.split(".")[0], targets)

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        outer, self.type_checking = self.type_checking, True
        for stmt in node.body:
            self.visit(stmt)
        self.type_checking = outer
        for stmt in node.orelse:
            self.visit(stmt)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        qualname = ".".join(self.scope)
        self.mod.functions.append(Function(qualname, node.lineno, node.end_lineno))
        outer, self.function = self.function, qualname
        self.generic_visit(node)
        self.function = outer
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef


def required_imports(setup_py: Path) -> frozenset[str]:
    """The import names of the distributions in setup.py's ``install_requires`` (read with ast)."""
    tree = ast.parse(setup_py.read_text(), filename=str(setup_py))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            reqs = ast.literal_eval(node.value)
            names = {re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r.strip()).group(0) for r in reqs}
            return frozenset(DIST_TO_IMPORT.get(n, n.lower().replace("-", "_")) for n in names)
    raise AssertionError(f"{setup_py}: no install_requires=[...] found")


def load_project(root: Path, packages=PROJECT_PACKAGES) -> Project:
    modules: dict[str, Module] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                continue  # .ipynb_checkpoints and the like
            parts = list(rel.with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
            modules[".".join(parts)] = Module(".".join(parts), rel.as_posix(), is_package, tree)
    for mod in modules.values():
        _Visitor(mod, modules).visit(mod.tree)
    return Project(root, tuple(packages), modules, required_imports(root / "setup.py"))


@cache
def repo_project() -> Project:
    return load_project(REPO_ROOT)


# ----------------------------------------------------------------------------------------------------------
# The rules. Each takes a Project and returns its violations, one line each.
# ----------------------------------------------------------------------------------------------------------


def import_graph(project: Project) -> dict[str, dict[str, str]]:
    """module -> {imported module: how (for messages)}, with the implied package edges."""
    graph: dict[str, dict[str, str]] = {name: {} for name in project.modules}
    for imp in project.imports:
        for target in imp.targets:
            graph[imp.module].setdefault(target, f"{project.where(imp)} `{imp.text}`")
            parts = target.split(".")
            for i in range(1, len(parts)):
                package = ".".join(parts[:i])
                if package in project.modules and not _within(imp.module, package):
                    graph[imp.module].setdefault(
                        package, f"{project.where(imp)} `{imp.text}` (which runs {package}/__init__)")
    return graph


def _strongly_connected(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _shortest_cycle(graph: dict[str, dict[str, str]], start: str, members: set[str]) -> list[str]:
    """A shortest cycle start -> ... -> start within members (breadth first)."""
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        u = queue.popleft()
        for v in sorted(graph[u]):
            if v == start:
                path = [u]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]
            if v in members and v not in parent:
                parent[v] = u
                queue.append(v)
    raise AssertionError(f"no cycle through {start}")


def check_cycles(project: Project) -> list[str]:
    """No import cycles among project modules."""
    graph = import_graph(project)
    violations = []
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue
        cycle = _shortest_cycle(graph, component[0], set(component))
        steps = "".join(f"\n      {a} -> {b}   [{graph[a][b]}]" for a, b in zip(cycle, cycle[1:]))
        violations.append(f"import cycle among {len(component)} modules: {', '.join(component)}; one cycle:{steps}")
    return violations


def check_direction(direction: Direction, project: Project) -> list[str]:
    """Allowed import directions (see DIRECTIONS)."""
    violations = []
    for imp in project.imports:
        if not _within_any(imp.module, direction.sources):
            continue
        for target in imp.targets:
            bad = [p for p in direction.forbidden if _within(target, p)]
            if bad and target not in direction.allowed and not _within_any(target, direction.sources):
                violations.append(f"{project.where(imp)}: {imp.module} imports {target} (`{imp.text}`): "
                                  f"{' / '.join(direction.sources)} must not import {bad[0]}")
    return violations


def check_function_imports(project: Project) -> list[str]:
    """No import inside a function, except of an optional dependency."""
    violations = []
    for imp in project.imports:
        if imp.function is None:
            continue
        if imp.top in project.packages or imp.top == "":
            why = "a project module"
        elif imp.top in project.required:
            why = f"required dependency '{imp.top}' (setup.py install_requires)"
        elif imp.top in sys.stdlib_module_names:
            why = f"standard library '{imp.top}'"
        else:
            continue  # an optional dependency: importing it lazily is the point
        violations.append(f"{project.where(imp)}: `{imp.text}` inside {imp.function}() imports {why}: "
                          "import it at module level")
    return violations


def check_function_length(project: Project) -> list[str]:
    """No function longer than MAX_FUNCTION_LINES lines."""
    violations = []
    for mod in project.modules.values():
        for fn in mod.functions:
            n = fn.end_lineno - fn.lineno + 1
            if n > MAX_FUNCTION_LINES:
                violations.append(f"{mod.path}:{fn.lineno}: {fn.qualname}() is {n} lines "
                                  f"(at most {MAX_FUNCTION_LINES})")
    return violations


def _dotted(node: ast.expr) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id] + parts[::-1])
    return None


def check_platform(project: Project) -> list[str]:
    """No platform named in a layer (see PLATFORM_FREE)."""
    violations = []
    for mod in project.modules.values():
        if not _within_any(mod.name, PLATFORM_FREE):
            continue
        for node in ast.walk(mod.tree):
            found = None
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value.lower() in PLATFORM_STRINGS:
                    found = f"string {node.value!r} names a platform"
            elif isinstance(node, ast.Name) and node.id in PLATFORM_NAMES:
                found = f"reference to `{node.id}`"
            elif isinstance(node, ast.Attribute):
                if node.attr in PLATFORM_NAMES | PLATFORM_ATTRIBUTES:
                    found = f"reference to `.{node.attr}`"
                elif _dotted(node) in PLATFORM_QUALIFIED:
                    found = f"reference to `{_dotted(node)}`"
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [a.name for a in node.names
                         if a.name in PLATFORM_NAMES or f"{node.module}.{a.name}" in PLATFORM_QUALIFIED]
                if names:
                    found = f"imports `{', '.join(names)}` from {node.module}"
            if found:
                violations.append(f"{mod.path}:{node.lineno}: {found} (layers must not name a platform)")
    return violations


RULES = {
    "no-import-cycles": check_cycles,
    **{f"direction-{d.name}": partial(check_direction, d) for d in DIRECTIONS},
    "no-function-level-imports": check_function_imports,
    "function-length": check_function_length,
    "no-platform-in-layers": check_platform,
}


def all_violations(project: Project) -> dict[str, list[str]]:
    return {rule: check(project) for rule, check in RULES.items()}


# ----------------------------------------------------------------------------------------------------------
# The tests on the repository.
# ----------------------------------------------------------------------------------------------------------


def test_scan_is_not_vacuous():
    project = repo_project()
    assert len(project.modules) >= MIN_MODULES, sorted(project.modules)
    for package in PROJECT_PACKAGES:
        assert package in project.modules, f"{package}/__init__.py not found under {REPO_ROOT}"
    assert {"jax", "flax", "orbax", "absl", "tokenizers"} <= project.required, sorted(project.required)
    assert sum(len(m.imports) for m in project.modules.values()) >= MIN_MODULES
    assert sum(len(m.functions) for m in project.modules.values()) >= MIN_MODULES


@pytest.mark.parametrize("rule", list(RULES))
def test_rule(rule):
    violations = RULES[rule](repo_project())
    if violations:
        pytest.fail(f"rule {rule}: {len(violations)} violation(s)\n  " + "\n  ".join(violations), pytrace=False)


# ----------------------------------------------------------------------------------------------------------
# Self-tests of the checker, on a tiny synthetic project.
# ----------------------------------------------------------------------------------------------------------


def _long_function(name: str, lines: int) -> str:
    """A decorated function of exactly ``lines`` lines, ``def`` included."""
    return "@staticmethod\n" + f"def {name}():\n" + "    x = 0\n" * (lines - 2) + "    return x\n"


CLEAN = {
    "setup.py": 'from setuptools import setup\nsetup(name="p", install_requires=["jax>=0.6", "orbax-checkpoint",'
                ' "absl-py>=2", "ml_dtypes", "tokenizers[x]>=0.1"])\n',
    "dsv3_jax/__init__.py": "",
    "dsv3_jax/config.py": "import dataclasses\n\nimport dsv3_jax\n\nConfig = dataclasses.dataclass\n",
    "dsv3_jax/hf_config.py": "X = 1\n",
    # A package __init__ importing its submodules, which import each other by absolute name: no implied edge
    # from a module to its own package, so no cycle.
    "dsv3_jax/ops/__init__.py": "from dsv3_jax.ops.experts import moe\n",
    "dsv3_jax/ops/experts.py": (
        "from typing import TYPE_CHECKING\n\nfrom dsv3_jax.ops.routing import route\n\n"
        "if TYPE_CHECKING:\n    from dsv3_jax.layers.mla import MLA  # ignored: neither a cycle nor a direction\n\n"
        "def moe():\n    if TYPE_CHECKING:\n        import json\n    return route\n"),
    "dsv3_jax/ops/routing.py": "def route():\n    return 'gpu'  # a platform is fine outside the layers\n",
    "dsv3_jax/layers/__init__.py": "",
    "dsv3_jax/layers/norm.py": "def rms():\n    return 'CPU-bound'  # not a platform name\n",
    # relative imports; dsv3_jax.hf_config is not dsv3_jax.hf
    "dsv3_jax/layers/mla.py": (
        "from .norm import rms\nfrom ..ops import experts\nfrom .. import hf_config\n\n"
        "class MLA:\n    def __call__(self):\n        import torch  # optional: fine\n        return torch\n\n"
        + _long_function("long_but_fine", MAX_FUNCTION_LINES)),
    "dsv3_jax/model.py": "from dsv3_jax.layers import mla\n",
    "dsv3_jax/data/__init__.py": "from .batches import batches\n",
    "dsv3_jax/data/batches.py": "def batches():\n    return 1\n",
    "dsv3_jax/data/tokenizer.py": "import json\n",
    "pallas_kernels/__init__.py": "import jax\n\nBACKEND = jax.default_backend()\n",
}


def _violations(tmp_path: Path, changes: dict[str, str] | None = None) -> dict[str, list[str]]:
    """The violations of a synthetic project, CLEAN with ``changes`` (path -> new text), by rule."""
    files = {**CLEAN, **(changes or {})}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return {rule: v for rule, v in all_violations(load_project(tmp_path)).items() if v}


def test_self_clean_project_passes(tmp_path):
    assert _violations(tmp_path) == {}
    project = load_project(tmp_path)
    assert project.required == {"jax", "orbax", "absl", "ml_dtypes", "tokenizers"}
    assert project.modules["dsv3_jax.layers.mla"].imports[1].targets == ("dsv3_jax.ops.experts",)
    assert project.modules["dsv3_jax.layers.mla"].imports[2].targets == ("dsv3_jax.hf_config",)


def _only(rule: str, tmp_path, files: dict[str, str]) -> list[str]:
    """The violations of `rule` in a synthetic package, asserting that no other rule fired."""
    found = _violations(tmp_path, files)
    assert list(found) == [rule]
    return found[rule]


def test_self_cycle(tmp_path):
    [message] = _only("no-import-cycles", tmp_path,
                      {"dsv3_jax/layers/norm.py": "import os\nfrom dsv3_jax.layers import mla\n"})
    assert "dsv3_jax.layers.mla, dsv3_jax.layers.norm;" in message
    assert "dsv3_jax/layers/norm.py:2" in message and "dsv3_jax/layers/mla.py:1" in message


def test_self_cycle_through_a_package_init(tmp_path):
    # data/__init__ -> data.batches -> layers.norm -> data.tokenizer, which runs data/__init__ first.
    [message] = _only("no-import-cycles", tmp_path,
                      {"dsv3_jax/data/batches.py": "from dsv3_jax.layers.norm import rms\n",
                       "dsv3_jax/layers/norm.py": "from dsv3_jax.data.tokenizer import json\n"})
    assert "dsv3_jax.data, dsv3_jax.data.batches, dsv3_jax.layers.norm;" in message
    assert "(which runs dsv3_jax.data/__init__)" in message


def test_self_direction(tmp_path):
    found = _violations(tmp_path, {"dsv3_jax/ops/routing.py": "from ..layers import norm\n",
                                   "pallas_kernels/__init__.py": "from dsv3_jax import hf_config\n",
                                   "dsv3_jax/config.py": "import dsv3_jax\nfrom dsv3_jax.ops.routing import route\n"})
    assert sorted(found) == ["direction-config", "direction-ops", "direction-pallas_kernels"]
    assert found["direction-ops"] == [
        "dsv3_jax/ops/routing.py:1: dsv3_jax.ops.routing imports dsv3_jax.layers.norm (`from ..layers import "
        "norm`): dsv3_jax.ops must not import dsv3_jax.layers"]
    assert [v.split(":")[:2] for v in found["direction-config"]] == [["dsv3_jax/config.py", "2"]]
    assert [v.split(":")[:2] for v in found["direction-pallas_kernels"]] == [["pallas_kernels/__init__.py", "1"]]


def test_self_function_level_imports(tmp_path):
    body = ("import os\n\ndef f():\n    import torch, json\n    from jax.experimental import pallas\n"
            "    from orbax import checkpoint\n    def g():\n        from dsv3_jax.layers import mla\n"
            "        from .layers import norm\n    return os\n")
    violations = _only("no-function-level-imports", tmp_path, {"dsv3_jax/model.py": body})
    assert [v.split(": `")[0] for v in violations] == [f"dsv3_jax/model.py:{n}" for n in (4, 5, 6, 8, 9)]
    assert "standard library 'json'" in violations[0] and "required dependency 'orbax'" in violations[2]
    assert "inside f.g()" in violations[3] and "a project module" in violations[4]


def test_self_function_length(tmp_path):
    too_long = _long_function("too_long", MAX_FUNCTION_LINES + 1)
    body = "class A:\n" + "".join("    " + line + "\n" for line in too_long.splitlines())
    found = _violations(tmp_path, {"dsv3_jax/ops/routing.py": body})
    assert found == {"function-length": [
        f"dsv3_jax/ops/routing.py:3: A.too_long() is {MAX_FUNCTION_LINES + 1} lines (at most {MAX_FUNCTION_LINES})"]}


def test_self_platform(tmp_path):
    body = ("import jax\nfrom jax import local_devices\n\n"
            "def f(x):\n    if jax.default_backend() == 'GPU':\n        return x\n"
            "    return jax.devices()[0].platform\n")
    violations = _only("no-platform-in-layers", tmp_path, {"dsv3_jax/layers/norm.py": body})
    assert sorted(v.rsplit(" (", 1)[0] for v in violations) == [
        "dsv3_jax/layers/norm.py:2: imports `local_devices` from jax",
        "dsv3_jax/layers/norm.py:5: reference to `.default_backend`",
        "dsv3_jax/layers/norm.py:5: string 'GPU' names a platform",
        "dsv3_jax/layers/norm.py:7: reference to `.platform`",
        "dsv3_jax/layers/norm.py:7: reference to `jax.devices`",
    ]

"""The package's layers, as ARCHITECTURE.md draws them: imports run one way, down the
layers, and nothing below the Ray wiring imports Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"

# Each layer may import the layers before it in this list, and itself.
LAYERS = ["errors", "spec", "storage", "engine", "output", "batch", "serve", "remote", "cli"]
# The Ray wiring: batch, serve and remote sit side by side; serve may use the batch job's actor.
ALLOWED_SIDEWAYS = {("serve", "batch")}
PURE = ["spec", "storage", "engine", "output"]


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _modules() -> list[str]:
    return sorted(
        "pipeline." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        for p in PACKAGE.rglob("*.py")
    )


def _imports(module: str) -> set[str]:
    """Every pipeline module ``module`` imports, at any depth in its code."""
    path = PACKAGE.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pipeline"))
    return {name for name in found if name != "pipeline"}


MODULES = set(_modules())


def test_every_module_sits_in_a_known_layer():
    stray = [m for m in MODULES if _layer(m) not in LAYERS + ["__init__"]]
    assert not stray, f"modules outside the layers of ARCHITECTURE.md: {stray}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_down_the_layers(module):
    layer = _layer(module)
    if layer == "__init__":
        return
    rank = LAYERS.index(layer)
    upward = [
        target
        for target in _imports(module)
        if LAYERS.index(_layer(target)) > rank and (layer, _layer(target)) not in ALLOWED_SIDEWAYS
    ]
    assert not upward, f"{module} imports {upward}, a layer above it"


def test_no_import_cycles_between_modules():
    graph = {m: _imports(m) & MODULES for m in MODULES}
    visiting, done = set(), set()

    def visit(node: str, path: list[str]) -> None:
        if node in done:
            return
        assert node not in visiting, "import cycle: " + " -> ".join(path[path.index(node):] + [node])
        visiting.add(node)
        for target in graph[node]:
            visit(target, path + [node])
        visiting.discard(node)
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def test_the_pure_layers_import_without_ray():
    """Every module of the pure layers imports in a process where `import ray` fails."""
    pure = [m for m in sorted(MODULES) if _layer(m) in PURE] + ["pipeline", "pipeline.errors"]
    script = (
        "import sys\n"
        "class NoRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ImportError('ray is not to be imported by ' + repr(name))\n"
        "sys.meta_path.insert(0, NoRay())\n"
        "import importlib\n"
        f"for name in {pure!r}:\n"
        "    importlib.import_module(name)\n"
        "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'ray got imported'\n"
        "print('ok', len(" + repr(pure) + "))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


def test_the_ray_check_can_fail():
    """The blocker really blocks: the job layer, which imports Ray, fails under it."""
    script = (
        "import sys\n"
        "class NoRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, NoRay())\n"
        "import pipeline.batch.run\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "blocked" in done.stderr


def test_nothing_reads_or_links_a_path_outside_the_repository():
    """A clone stands on its own: no tracked file names the team's ../shared folder."""
    root = PACKAGE.parent
    listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if listed.returncode == 0:
        names = listed.stdout.splitlines()
    else:  # a copy without .git (CI runs one): every file but what the install and runs make
        made = {".venv", ".git", "__pycache__", ".pytest_cache", "output", "build"}
        names = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not made & set(p.relative_to(root).parts)]
    offenders = []
    for name in names:
        path = root / name
        if name == "tests/test_layout.py" or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_text(errors="ignore")
        if "../shared" in text or '"shared" / "data"' in text or "parents[2]" in text:
            offenders.append(name)
    assert not offenders, f"these files read or link a path outside the repository: {offenders}"


def test_every_module_is_in_architectures_where_a_behaviour_lives_table():
    """ARCHITECTURE.md's table is the map a newcomer reads: a module missing from it is a
    module nobody is told about."""
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    start = text.index("## Where a behaviour lives")
    table = text[start : text.index("\n## ", start + 1)]
    files = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    missing = sorted(f for f in files if f"`{f}`" not in table and f"`{f} (" not in table)
    assert not missing, f"modules not in ARCHITECTURE.md's 'Where a behaviour lives' table: {missing}"

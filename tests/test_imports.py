"""No import cycles inside ``fishnet_pl`` and ``datamodules``: the modules form layers, each importing only below.

The graph is read from the source with ``ast``, so it sees every ``import`` statement of a module: at module level
and inside functions alike. A function-level import is how a cycle hides (``fishnet.py`` importing ``official.py``
inside a function, which imports ``fishnet.py`` on top), so it counts. Not counted: a package's own ``__init__``
that Python runs before any of its modules (it is no edge the module wrote), and ``importlib`` calls by name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fishnet_pl", "datamodules")


def module_files(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` of the packages (``pkg/__init__.py`` is ``pkg``)."""
    modules = {}
    for package in packages:
        for file in sorted((root / package).rglob("*.py")):
            parts = file.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return modules


def imported_modules(name: str, file: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``file`` (module ``name``) imports anywhere in its body."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..a import b
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found.update(submodules or {base})
    return {m for m in found if m in known and m != name}


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    files = module_files(root, packages)
    return {name: imported_modules(name, file, set(files)) for name, file in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, nodes in sorted order)."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" once all its imports are explored
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*stack[stack.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_packages_have_no_import_cycle():
    graph = import_graph()
    assert {"fishnet_pl.models.fishnet", "datamodules.cityscapes", "fishnet_pl.tasks.base"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("b_source", [
    "from pkg.a import f\n",  # module level
    "def g():\n    from pkg.a import f\n    return f\n",  # inside a function: counted too
    "from . import a\n",  # relative, the module by name
    "import pkg.a\n",
])
def test_a_cycle_is_found_and_named(tmp_path, b_source):
    write_package(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from pkg.sub.b import g\ndef f(): pass\n",
                             "pkg/sub/__init__.py": "", "pkg/sub/b.py": b_source.replace(". import", ".. import"),
                             "pkg/c.py": "import pkg.a\n"})
    graph = import_graph(tmp_path, ("pkg",))
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_layers_without_cycle_pass(tmp_path):
    # a package __init__ importing its modules, which import each other downwards, is no cycle
    write_package(tmp_path, {"pkg/__init__.py": "from pkg.a import f\nfrom pkg import b\n",
                             "pkg/a.py": "from pkg.b import g\ndef f(): pass\n",
                             "pkg/b.py": "import os\ndef g(): pass\n"})
    graph = import_graph(tmp_path, ("pkg",))
    assert graph == {"pkg": {"pkg.a", "pkg.b"}, "pkg.a": {"pkg.b"}, "pkg.b": set()}
    assert find_cycle(graph) is None


def test_names_that_outlive_a_move_still_resolve():
    # Checkpoints saved before the segmentation base left segmentation_folder.py record its evaluation transform
    # there (``DatasetInfo.predict``), and ``python -m datamodules.streaming convert`` is the converter's command.
    from datamodules.predict import import_object
    from datamodules.segmentation import eval_transform
    from datamodules.segmentation_folder import SegmentationFolderDataModule

    assert import_object("datamodules.segmentation_folder.eval_transform") is eval_transform
    config = SegmentationFolderDataModule("data", classes=["a", "b"]).dataset_info.predict
    assert import_object(config["transform"]) is eval_transform
    done = subprocess.run([sys.executable, "-m", "datamodules.streaming", "convert", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "usage: python -m datamodules.streaming convert" in done.stdout, done.stderr

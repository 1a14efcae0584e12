"""The code's shape as the README describes it: no import cycle among lora_lab's modules (counting
imports inside functions), and every module named in the README's layout section."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lora_lab", "hydra_plugins/lora_lab_sweeper")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """Each module's imports of the project's modules, wherever in the file they are: `from a.b import c`
    counts as an import of a.b.c where that is a module, else of a.b."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in known else node.module)
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            found.append(path[path.index(node) :] + [node])
            return
        if node in done:
            return
        for target in sorted(graph[node]):
            visit(target, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return found


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert "lora_lab.report.plots" in graph["lora_lab.report"]  # the walk sees the package's imports
    assert cycles(graph) == []


def test_a_cycle_is_found_where_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = re.search(r"## Layout\n\n```\n(.*?)```", readme, re.S).group(1)
    named = set(re.findall(r"[\w/]+\.py|[\w/]+/", layout))
    missing = []
    for name, path in modules().items():
        if name in {p.replace("/", ".") for p in PACKAGES}:
            continue  # the packages themselves
        relative = path.relative_to(ROOT).as_posix()
        folders = {
            f"{parent.relative_to(ROOT).as_posix()}/" for parent in path.parents if ROOT in parent.parents
        }
        in_package = (path.parent / "__init__.py").exists()
        # A package's __init__.py is named by its folder; a file outside any package (evaluate's metric
        # scripts) by a folder above it.
        if path.name == "__init__.py" or not in_package:
            covered = bool(folders & named)
        else:
            covered = bool({relative, path.name} & named)
        if not covered:
            missing.append(relative)
    assert missing == []

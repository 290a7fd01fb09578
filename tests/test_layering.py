"""The layering the design holds to: `pipeline/` (infrastructure) never imports `stages/`, and no
project modules import each other in a cycle. Imports inside functions count too: a lazy import
is still a dependency, and hiding one in a function is how cycles creep in."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (anywhere in the file)."""
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod when there is one
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_pipeline_never_imports_stages():
    graph = import_graph(ROOT)
    wrong = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith("pipeline") for t in ts
                   if t.startswith("stages"))
    assert not wrong, "pipeline/ imports stages/: " + "; ".join(wrong)


def test_no_import_cycle_among_project_modules():
    cycle = find_cycle(import_graph(ROOT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_see_a_cycle_and_a_stage_import(tmp_path):
    # The detector itself: a synthetic tree with a lazy import cycle and a pipeline -> stages import.
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "stages").mkdir()
    for pkg in ("pipeline", "stages"):
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "a.py").write_text("from pipeline import b\n")
    (tmp_path / "pipeline" / "b.py").write_text("def f():\n    from . import a\n    import stages.s\n")
    (tmp_path / "stages" / "s.py").write_text("from pipeline.a import x\n")
    graph = import_graph(tmp_path)
    assert graph["pipeline.a"] == {"pipeline.b"}
    assert graph["pipeline.b"] == {"pipeline.a", "stages.s"}
    assert find_cycle(graph) == ["pipeline.a", "pipeline.b", "pipeline.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None

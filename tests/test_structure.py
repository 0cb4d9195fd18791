"""The package structure holds: the import arrows between vserve's first-level packages are
exactly the ones ``docs/design/architecture.md`` allows (lazy imports included), they form
no cycle, and the torch-free processes import no torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vserve"
DOC = ROOT / "docs" / "design" / "architecture.md"
_ROW = re.compile(r"^\|\s*`(\w+)`\s*\|(.*)\|\s*$")


def first_level(module: str) -> str | None:
    """``vserve.engine.core`` → ``engine``; ``vserve`` itself → ``vserve``; else None."""
    parts = module.split(".")
    if parts[0] != "vserve":
        return None
    return parts[1] if len(parts) > 1 else "vserve"


def node_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    if len(rel.parts) == 1:
        return "vserve" if rel.name == "__init__.py" else rel.stem
    return rel.parts[0]


def imports_of(path: Path) -> Iterator[tuple[str, int]]:
    """Every vserve module ``path`` imports — at the top, inside functions, under
    TYPE_CHECKING — with its line."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "vserve":
                for alias in node.names:  # from vserve import x: x may be a module
                    sub = PACKAGE / alias.name
                    is_module = sub.is_dir() or sub.with_suffix(".py").is_file()
                    yield (f"vserve.{alias.name}" if is_module else "vserve"), node.lineno
            else:
                yield node.module, node.lineno


def actual_arrows() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) first-level nodes → where each such import is."""
    arrows: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        src = node_of(path)
        for module, line in imports_of(path):
            dst = first_level(module)
            if dst is not None and dst != src:
                arrows.setdefault((src, dst), []).append(f"{path.relative_to(ROOT)}:{line}")
    return arrows


def allowed_arrows() -> dict[str, set[str]]:
    """The table under "Import layers" in architecture.md: node → what it may import."""
    text = DOC.read_text()
    section = text.split("## Import layers", 1)[1].split("\n## ", 1)[0]
    allowed: dict[str, set[str]] = {}
    for line in section.splitlines():
        m = _ROW.match(line)
        if m:
            allowed[m.group(1)] = set(re.findall(r"`(\w+)`", m.group(2)))
    assert allowed, "no import table found in architecture.md"
    return allowed


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_every_package_is_in_the_layer_table() -> None:
    nodes = {node_of(p) for p in PACKAGE.rglob("*.py")}
    missing = nodes - set(allowed_arrows())
    assert not missing, f"add these to the import table in architecture.md: {sorted(missing)}"


def test_the_allowed_layers_have_no_cycle() -> None:
    assert find_cycle(allowed_arrows()) is None


def test_imports_follow_the_layers() -> None:
    allowed = allowed_arrows()
    forbidden = {arrow: where for arrow, where in actual_arrows().items()
                 if arrow[1] not in allowed.get(arrow[0], set())}
    report = "\n".join(f"{a} → {b}: {', '.join(w)}" for (a, b), w in sorted(forbidden.items()))
    assert not forbidden, f"imports the layer table does not allow:\n{report}"


def test_no_import_cycle_between_packages() -> None:
    graph: dict[str, set[str]] = {}
    for a, b in actual_arrows():
        graph.setdefault(a, set()).add(b)
    assert find_cycle(graph) is None


def test_the_checker_sees_a_forbidden_arrow(tmp_path: Path) -> None:
    """The checks above can fail: a lazy import inside a function is an arrow too."""
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from vserve.worker import model_runner\n")
    assert [m for m, _ in imports_of(sample)] == ["vserve.worker"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert "worker" not in allowed_arrows()["api"]


# Modules of the processes that must never load torch: the supervisor (and the CLI that
# starts it), the API servers, and a user's LLM script (its engine child loads torch).
TORCH_FREE = ["vserve.cli.main", "vserve.cli.serve", "vserve.launch.supervisor",
              "vserve.models.source", "vserve.models.arch", "vserve.api.server",
              "vserve.api.app", "vserve.frontend.async_client", "vserve.metrics.exposition",
              "vserve.offline", "vserve"]


@pytest.mark.parametrize("heavy", ["torch", "transformers", "numpy"])
def test_torch_free_processes_import_nothing_heavy(heavy: str) -> None:
    code = (f"import sys, {', '.join(TORCH_FREE)}; "
            f"assert {heavy!r} not in sys.modules, 'imported {heavy}'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr

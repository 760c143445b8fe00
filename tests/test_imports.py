"""The import graph of rcn_dist, read from the source: no cycles, and the layers point one way.

Every `import` counts, at module level and inside functions (a lazy import is still a
dependency). The rules: parallel/ (the process layout) and model/ (the single-device network)
never import the loop, a command module or the CLI; model/ imports nothing distributed.
"""

from __future__ import annotations

import ast
from pathlib import Path

from rcn_dist.cli import COMMANDS

PACKAGE = Path(__file__).resolve().parents[1] / "rcn_dist"
ABOVE_LAYERS = {"rcn_dist.loop", "rcn_dist.cli"} | {m for m, _ in COMMANDS.values()}
"""What parallel/ and model/ may not import (rcn_dist.parallel.env, itself a command, excepted for parallel/)."""
DISTRIBUTED = ("torch.distributed", "deepspeed", "mpi4py", "rcn_dist.parallel")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """Every module `path` (module `name`) imports, anywhere in the file; inside the package, the
    most specific module named (`from rcn_dist.parallel import checkpoint` -> rcn_dist.parallel.checkpoint)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in modules else base)
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the modules it imports (all of them, not only the package's)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    return {name: imports_of(p, name, modules) - {name} for name, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the graph's own modules (a list a -> b -> ... -> a), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m] & graph.keys()):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_graph_is_read_from_the_source():
    g = import_graph()
    # Module-level and function-level imports, relative and absolute, are all edges.
    assert "rcn_dist.loop" in g["rcn_dist.train"]
    assert "rcn_dist.parallel.collectives" in g["rcn_dist.parallel.env"]  # imported inside RankLayout.groups
    assert "rcn_dist.parallel.checkpoint" in g["rcn_dist.parallel.pipeline"]  # `from rcn_dist.parallel import checkpoint`
    assert "rcn_dist.bench.pipeline" in g["rcn_dist.bench"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_function_level_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "c.py").write_text("import os\n\n\ndef g():\n    import pkg.a\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(pkg)) is None


def test_layers_point_one_way():
    bad = []
    for m, deps in import_graph().items():
        if m.startswith(("rcn_dist.parallel", "rcn_dist.model")):
            bad += [f"{m} -> {d}" for d in deps if not d.startswith("rcn_dist.parallel")
                    and any(d == x or d.startswith(x + ".") for x in ABOVE_LAYERS)]
        if m.startswith("rcn_dist.model"):
            bad += [f"{m} -> {d}" for d in deps if d.startswith(DISTRIBUTED)]
    assert not bad, "forbidden imports: " + "; ".join(sorted(bad))


def test_the_package_metadata_reads_without_a_deprecation_warning():
    """pyproject.toml as setuptools reads it at `pip install`: no deprecated form (the `license`
    table was one: it printed a SetuptoolsDeprecationWarning at every install)."""
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), str(Path(__file__).resolve().parents[1] / "pyproject.toml"))
    assert [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, Warning)] == []
    assert dist.metadata.license_expression == "MIT" and dist.metadata.name == "rcn_dist"

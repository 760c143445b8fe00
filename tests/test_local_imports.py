"""Imports at module level (issue 23, point 5): a function-local import is the exception, and says why.

The reasons that count: a heavy or optional third-party module a command does not always need
(deepspeed, mpi4py, matplotlib, submitit, the optional loggers), an order that matters (nothing
may load torch before the entry points catch the signals: rcn_dist.signals, rcn_dist.cli), and
a `python -m` entry point that a top-level import would load twice. Moving an import to the top
never creates a cycle: tests/test_imports.py already counts function-level imports as edges.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rcn_dist"
MAX_LOCAL_IMPORTS = 42
"""A third of the 128 function-local imports counted when issue 23 was filed."""
TORCH_FREE = ("rcn_dist", "rcn_dist.cli", "rcn_dist.submit", "rcn_dist.report", "rcn_dist.data.prepare")
"""Modules whose import must not load torch: the CLI and what runs before a command catches the
signals (a submitit job unpickles rcn_dist.submit first), and the commands that never need it."""


def local_imports(source: str) -> list[ast.Import | ast.ImportFrom]:
    """The import statements inside a function body (at any depth: nested blocks, classes and
    functions within it), in source order."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(source), False)
    return sorted(found, key=lambda n: n.lineno)


def comment_lines(source: str) -> set[int]:
    """Lines that hold a comment (a real one: tokenize, not a `#` inside a string)."""
    return {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT}


def unexplained(source: str) -> list[int]:
    """Lines of the local imports that give no reason: no comment on the statement's own lines
    and no comment-only line just above it."""
    lines = source.splitlines()
    comments = comment_lines(source)
    bad = []
    for node in local_imports(source):
        own = any(n in comments for n in range(node.lineno, (node.end_lineno or node.lineno) + 1))
        above = node.lineno >= 2 and lines[node.lineno - 2].lstrip().startswith("#")
        if not (own or above):
            bad.append(node.lineno)
    return bad


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def per_file_counts() -> Counter[str]:
    return Counter({str(p.relative_to(PACKAGE.parent)): n for p in package_files()
                    if (n := len(local_imports(p.read_text())))})


def test_the_finder_sees_only_imports_inside_functions():
    src = (
        "import os\n"
        "try:\n    import numpy\nexcept ImportError:\n    pass\n"
        "class A:\n    import json\n\n    def m(self):\n        if True:\n            import re  # why\n"
        "\n\ndef f():\n    # why not at the top\n    from a import (\n        b,\n    )\n"
        "\n    def g():\n        import sys\n\n    class C:\n        import io\n"
        "\n\nh = lambda: __import__('x')\n"
        "s = '''\ndef fake():\n    import nothing\n'''\n"
    )
    assert [n.lineno for n in local_imports(src)] == [11, 16, 21, 24]
    assert unexplained(src) == [21, 24]  # `# why` on its line, a comment line above `from a import`
    assert unexplained("def f():\n    x = '# not a comment'\n    import os\n") == [3]


def test_every_local_import_says_why():
    bad = [f"{p.relative_to(PACKAGE.parent)}:{line}: {p.read_text().splitlines()[line - 1].strip()}"
           for p in package_files() for line in unexplained(p.read_text())]
    assert not bad, ("function-local imports without a reason (a comment on the line or just above; "
                     "or move them to the top):\n" + "\n".join(bad))


def test_local_imports_are_few():
    counts = per_file_counts()
    total = sum(counts.values())
    table = "\n".join(f"{n:4d}  {f}" for f, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    assert total <= MAX_LOCAL_IMPORTS, (f"{total} function-local imports in rcn_dist, more than "
                                        f"MAX_LOCAL_IMPORTS = {MAX_LOCAL_IMPORTS}; per file:\n{table}")


def test_the_cli_and_the_light_commands_import_no_torch():
    code = ("import importlib, sys\n"
            f"for m in {TORCH_FREE!r}:\n"
            "    importlib.import_module(m)\n"
            "heavy = sorted(m for m in ('torch', 'deepspeed', 'mpi4py', 'matplotlib') if m in sys.modules)\n"
            "print(' '.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"importing {', '.join(TORCH_FREE)} loaded {out.stdout.strip()}"

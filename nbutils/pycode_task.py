"""The built-in task: Python function source -> one-line summary, mined from the standard library.

Every function or method with a docstring in the running interpreter's standard library gives one
pair: the source without its docstring (dedented) and the docstring's first sentence. Works offline
on any machine with Python, so the series runs anywhere.
"""

from __future__ import annotations

import ast
import collections
import inspect
import re
import sys
import sysconfig
import textwrap
from pathlib import Path

from nbutils import sequences

INSTRUCTION = "Summarize in one sentence what this Python function does."
SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "turtledemo",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
    "ensurepip",
    "pydoc_data",
    "__phello__",
    "venv",
}
MIN_WORDS, MAX_WORDS = 3, 30
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files, minus test suites, demos and installed packages."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if (
            SKIP_DIRS.intersection(parts[:-1])
            or parts[-1].startswith("test_")
            or parts[-1] == "conftest.py"
        ):
            continue
        files.append(path)
    return files


def module_of(path: Path, root: Path) -> str:
    """Top-level module a file belongs to (``email/utils.py`` -> ``email``)."""
    first = path.relative_to(root).parts[0]
    return first.removesuffix(".py")


def first_sentence(docstring: str) -> str:
    """First sentence of a docstring's first paragraph, on one line."""
    paragraph = inspect.cleandoc(docstring).split("\n\n")[0]
    text = " ".join(paragraph.split())
    return _SENTENCE_END.split(text, maxsplit=1)[0].strip()


def source_without_docstring(lines: list[str], node: ast.AST) -> str | None:
    """Dedented source of a function with its docstring lines removed (None if nothing is left)."""
    doc = node.body[0]
    if doc.lineno == node.lineno:
        return None  # docstring on the ``def`` line itself
    if len(node.body) == 1:
        return None  # the docstring is the whole body
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    kept = lines[start : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
    return textwrap.dedent("".join(kept)).strip("\n")


def pairs_from_file(path: Path, root: Path) -> list[dict]:
    """All (source, summary) candidates of one file; unparsable files give none."""
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines, module, out = text.splitlines(keepends=True), module_of(path, root), []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=False)
        if not doc:
            continue
        source = source_without_docstring(lines, node)
        if source:
            rel = path.relative_to(root).as_posix()
            out.append(
                {
                    "id": f"{rel}:{node.lineno}:{node.name}",
                    "module": module,
                    "instruction": INSTRUCTION,
                    "input": source,
                    "output": first_sentence(doc),
                }
            )
    return out


def summary_problem(summary: str) -> str | None:
    """Why a summary is unusable (doctest, too short, too long), or None."""
    if ">>>" in summary:
        return "summary_is_doctest"
    words = len(summary.split())
    if words < MIN_WORDS:
        return "summary_too_short"
    if words > MAX_WORDS:
        return "summary_too_long"
    return None


def mine_stdlib(
    tokenizer=None, max_source_tokens: int = 384, root: Path | None = None
) -> tuple[list[dict], dict]:
    """Mine the pairs; returns ``(rows, info)`` with drop counts, per-module counts, Python
    version."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    dropped: collections.Counter = collections.Counter()
    rows, seen = [], set()
    for path in stdlib_files(root):
        for row in pairs_from_file(path, root):
            problem = summary_problem(row["output"])
            if problem is None and row["input"] in seen:
                problem = "duplicate_source"
            if problem:
                dropped[problem] += 1
                continue
            seen.add(row["input"])
            rows.append(row)
    if tokenizer is not None:
        lengths = sequences.tokenize_batch(tokenizer, [r["input"] for r in rows])
        keep = [len(ids) <= max_source_tokens for ids in lengths]
        dropped["source_over_token_budget"] = keep.count(False)
        rows = [r for r, k in zip(rows, keep) if k]
    info = {
        "python_version": sys.version.split()[0],
        "stdlib": str(root),
        "instruction": INSTRUCTION,
        "max_source_tokens": max_source_tokens if tokenizer is not None else None,
        "mined_drops": dict(sorted(dropped.items())),
        "per_module": dict(sorted(collections.Counter(r["module"] for r in rows).items())),
    }
    return rows, info

"""Render a run's executed notebooks as Markdown pages (``make docs``): ``docs/NN_name.md`` +
images.

    python -m nbutils.docs [RUN_ID]     # default: the latest finished cpu run under runs/

Each page starts with where its numbers come from (run id, profile, date, machine, package
versions). The parameters papermill injected for the run are shown after a marked line, so
:func:`code_cells` can compare the rest of the code with the notebook sources
(``tests/test_docs.py``: the pages cannot drift silently from the code).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import nbformat

from nbutils import files, paths, pipeline

DOCS_DIR = paths.REPO_ROOT / "docs"
INJECTED_MARK = "*Parameters of this run (injected by papermill):*"
FENCE = re.compile(r"^```python\n(.*?)\n```$", re.DOTALL | re.MULTILINE)


def latest_run(profile: str = "cpu") -> str:
    """The newest run of ``profile`` whose notebooks all finished."""
    for folder in sorted(paths.RUNS_DIR.glob(f"*_{profile}*"), reverse=True):
        timings = folder / "timings.json"
        if timings.exists() and all(n in files.read_json(timings) for n in pipeline.SERIES):
            return folder.name
    raise SystemExit(
        f"no finished '{profile}' run under {paths.RUNS_DIR}: run `make run` first, or pass a RUN_ID."
    )


def header(run_id: str, config: dict) -> str:
    """Where the page's outputs come from."""
    v = config.get("versions", {})
    packages = ", ".join(f"{k} {ver}" for k, ver in sorted(v.get("packages", {}).items()) if ver)
    m = config.get("machine") or {
        "cpus": "?",
        "cpu_model": "an unrecorded machine",
        "memory_gb": "?",
        "accelerator": "unrecorded",
    }
    return (
        f"> Rendered from run `{run_id}` (profile `{config['profile']}`, started {config.get('started', '?')}): "
        f"{m['cpus']} × {m['cpu_model']}, {m['memory_gb']} GB, accelerator {m['accelerator']}; Python {v.get('python')} "
        f"on {v.get('platform')}; {packages}. Regenerate with `make run`, then `make docs`.\n\n"
    )


def render_notebook(executed: Path, target: Path, head: str) -> Path:
    """One executed notebook as ``target`` (Markdown) with its images in ``<stem>_files/``."""
    from nbconvert import MarkdownExporter

    nb = nbformat.read(executed, as_version=4)
    cells = []
    for cell in nb.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            cells.append(nbformat.v4.new_markdown_cell(INJECTED_MARK))
        cells.append(cell)
    nb.cells = cells
    body, resources = MarkdownExporter().from_notebook_node(
        nb, resources={"output_files_dir": f"{target.stem}_files"}
    )
    images = target.parent / f"{target.stem}_files"
    shutil.rmtree(images, ignore_errors=True)
    for name, blob in resources.get("outputs", {}).items():
        files.write_bytes(target.parent / name, blob)
    return files.write_text(target, head + body)


def render(run_id: str, out_dir: Path = DOCS_DIR) -> list[Path]:
    """Every notebook of the run's series as a page under ``out_dir``."""
    run = paths.RUNS_DIR / run_id
    config = files.read_json(run / "config.json")
    series = pipeline.PROFILES[config["profile"]].series
    missing = [n for n in series if not (run / f"{n}.ipynb").exists()]
    if missing:
        raise SystemExit(
            f"runs/{run_id} lacks the executed {', '.join(missing)}; render a finished run."
        )
    return [
        render_notebook(run / f"{n}.ipynb", out_dir / f"{n}.md", header(run_id, config))
        for n in series
    ]


def code_cells(markdown: str) -> list[str]:
    """The notebook code cells of a rendered page, without the run's injected parameters."""
    blocks, injected = [], markdown.split(INJECTED_MARK)
    for i, part in enumerate(injected):
        found = FENCE.findall(part)
        # the first block after the mark holds the injected parameters
        blocks += found[1:] if i > 0 else found
    return [b.strip() for b in blocks]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="Render a run's executed notebooks into docs/.")
    parser.add_argument(
        "run_id",
        nargs="?",
        default="",
        help="a folder under runs/ (default: the latest finished cpu run)",
    )
    args = parser.parse_args(argv)
    for page in render(args.run_id or latest_run()):
        print(page.relative_to(paths.REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())

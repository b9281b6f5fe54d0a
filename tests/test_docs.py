"""What a reader sees: clean executed notebooks, and docs/ pages that cannot drift from the
sources."""

import subprocess
import sys

import jupytext
import nbformat
import pytest
from conftest import FAKE_KAGGLE
from test_kaggle import secret_leaks

from nbutils import docs, paths, pipeline, quiet

FORBIDDEN_CHARS = {
    "\x1b": "an ANSI escape code",
    "\x08": "a backspace",
    "\r": "a carriage return (a redrawn bar)",
}


def noisy(line: str) -> bool:
    """A known noise line or a warning (an output line a reader should not see)."""
    return bool(line.strip()) and (quiet.is_noise(line) or "Warning:" in line)


def output_problems(nb_path) -> list[str]:
    """Every saved output line with an escape code, a redraw, a known noise line or a warning."""
    problems = []
    for i, cell in enumerate(nbformat.read(nb_path, as_version=4).cells):
        for out in cell.get("outputs", []):
            text = out.get("text") or "".join(
                v for k, v in out.get("data", {}).items() if k == "text/plain"
            )
            for char, what in FORBIDDEN_CHARS.items():
                if char in text:
                    problems.append(f"{nb_path.name} cell {i}: {what}")
            for line in text.splitlines():
                if noisy(line) or out.get("name") == "stderr":
                    problems.append(f"{nb_path.name} cell {i}: {line[:120]!r}")
            if stray_value(out):
                problems.append(f"{nb_path.name} cell {i}: a stray return value {text[:80]!r}")
    return problems


def stray_value(output: dict) -> bool:
    """A cell's last value echoed as plain text only (e.g. the path a write returns)."""
    return output.get("output_type") == "execute_result" and set(output["data"]) == {"text/plain"}


def check_clean_outputs(root, run_id: str) -> None:
    """The executed notebooks of run ``run_id`` under ``root``: no noise, progress as plain lines,
    no Kaggle credentials anywhere in what the run wrote."""
    notebooks = sorted((root / "runs" / run_id).glob("0*.ipynb"))
    assert [p.stem for p in notebooks] == list(pipeline.SERIES)
    problems = [p for nb in notebooks for p in output_problems(nb)]
    assert not problems, "\n".join(problems[:20])
    printed = "".join(
        o.get("text", "")
        for nb in notebooks
        for c in nbformat.read(nb, as_version=4).cells
        for o in c.get("outputs", [])
    )
    assert "generating: 8/8 rows (100%)" in printed  # progress as plain lines
    assert not secret_leaks(root, list(FAKE_KAGGLE.values()))


def test_executed_notebooks_have_clean_outputs_and_no_secrets(smoke_run):
    """What a reader sees: the smoke run on the pinned stack."""
    check_clean_outputs(smoke_run, "smoke")


def test_kaggle_stack_outputs_are_clean_too(image_smoke_run):
    """What a Kaggle user sees: the smoke run on the Kaggle image's stack (TensorFlow and JAX both
    loaded)."""
    check_clean_outputs(image_smoke_run, "image")


def test_the_output_check_finds_noise(tmp_path):
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "x",
                outputs=[
                    nbformat.v4.new_output("stream", name="stdout", text="fine\rredrawn 50%\n"),
                    nbformat.v4.new_output(
                        "stream",
                        name="stdout",
                        text="I0000 00:00:1.2 123 port.cc:153] oneDNN custom operations are on.\n",
                    ),
                    nbformat.v4.new_output(
                        "execute_result", data={"text/plain": "PosixPath('runs/x/a.json')"}
                    ),
                ],
            )
        ]
    )
    nbformat.write(nb, tmp_path / "x.ipynb")
    problems = output_problems(tmp_path / "x.ipynb")
    assert len(problems) == 3 and "carriage return" in problems[0] and "port.cc" in problems[1]
    assert "stray return value" in problems[2]
    assert page_output_problems("    PosixPath('runs/x/a.json')\n") == [
        "PosixPath('runs/x/a.json')"
    ]


def notebook_code(name: str) -> list[str]:
    return [
        c.source.strip()
        for c in jupytext.read(paths.NOTEBOOKS_DIR / f"{name}.py").cells
        if c.cell_type == "code"
    ]


def test_rendered_pages_hold_the_code_outputs_and_images(smoke_run, tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "RUNS_DIR", smoke_run / "runs")
    pages = docs.render("smoke", tmp_path)
    assert [p.stem for p in pages] == list(pipeline.SERIES)
    for page in pages:
        text = page.read_text()
        assert (
            text.startswith("> Rendered from run `smoke` (profile `smoke`")
            and "accelerator" in text
        )
        assert docs.code_cells(text) == notebook_code(page.stem), page.name
    # the loss curve, as an image file
    assert list((tmp_path / "03_lora_finetune_files").glob("*.png"))
    edited = pages[2].read_text().replace("training.train_lora(", "training.train_lora_v2(")
    assert docs.code_cells(edited) != notebook_code(pages[2].stem)  # a changed line is seen


def page_output_problems(markdown: str) -> list[str]:
    """Output lines of a rendered page (indented, outside code fences) that are noise, warnings or
    redraws."""
    problems, fenced = [], False
    # not splitlines(): a carriage return inside a line is a problem
    for line in markdown.split("\n"):
        fenced = fenced != line.startswith("```")
        if not fenced and line.startswith("    ") and line.strip():
            out = line[4:]
            if noisy(out) or any(c in out for c in FORBIDDEN_CHARS) or "PosixPath(" in out:
                problems.append(out[:120])
    return problems


@pytest.mark.parametrize("name", pipeline.SERIES)
def test_committed_pages_show_clean_outputs(name):
    """What a reader of docs/ sees: the outputs of the `make run` they were rendered from (the
    pinned stack)."""
    # keeps any \r
    problems = page_output_problems((docs.DOCS_DIR / f"{name}.md").read_bytes().decode())
    assert not problems, problems[:10]


def test_the_page_check_sees_output_lines():
    code = "```python\nx = 1\n    y = 2  # indented code is not output\n```\n\n"
    assert page_output_problems(code + "    fine\n") == []
    assert page_output_problems(
        code
        + "    W0000 00:00:1.2 7 computation_placer.cc:177] computation placer already registered\n"
    )
    assert page_output_problems(code + "    generating: 50%\r100%\n")


@pytest.mark.slow  # a notebook edit needs a new `make run` + `make docs` before this passes
@pytest.mark.parametrize("name", pipeline.SERIES)
def test_committed_pages_match_the_notebook_sources(name):
    page = docs.DOCS_DIR / f"{name}.md"
    assert page.exists(), f"docs/{name}.md is missing: run `make run` then `make docs`"
    assert docs.code_cells(page.read_text()) == notebook_code(name), (
        f"docs/{name}.md is older than notebooks/{name}.py: run `make docs` on a new run"
    )


def test_readme_is_for_users_and_links_the_pages_in_order():
    readme = (paths.REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200, "README is for users: move details to docs/"
    links = [readme.find(f"(docs/{name}.md)") for name in pipeline.SERIES]
    assert all(i > 0 for i in links) and links == sorted(links)
    # the tutorial comes first after the two commands
    first_section = readme.find("\n## ")
    assert readme.find("## Read the tutorial") == first_section + 1, "the tutorial first"


def table_sources(markdown: str) -> list[tuple[str, str]]:
    """(header row, the line before the table) of every Markdown table holding a digit."""
    lines, found = markdown.split("\n"), []
    for i, line in enumerate(lines):
        starts = line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|"))
        body = []
        for row in lines[i + 2 :]:
            if not row.startswith("|"):
                break
            body.append(row)
        if starts and any(ch.isdigit() for ch in "".join(body)):
            before = next((x for x in reversed(lines[:i]) if x.strip()), "")
            found.append((line, before))
    return found


FIGURE_PAGES = [
    "README.md",
    "docs/results.md",
    "docs/performance.md",
    "docs/design.md",
    "docs/kaggle.md",
]


@pytest.mark.parametrize("page", FIGURE_PAGES)
def test_every_figure_table_names_its_run_or_command(page):
    tables = table_sources((paths.REPO_ROOT / page).read_text())
    unsourced = [head for head, before in tables if not before.startswith("Source:")]
    assert not unsourced, (
        f"{page}: a `Source:` line (run id or command, machine) must precede {unsourced}"
    )


def test_the_source_check_sees_a_table_without_one():
    page = "Some text.\n\n| a | b |\n|---|---|\n| x | 1.5 |\n"
    assert [b for _, b in table_sources(page)] == ["Some text."]
    assert table_sources("Source: run x.\n| a |\n|---|\n| 1 |\n")[0][1].startswith("Source:")
    assert table_sources("| a |\n|---|\n| words |\n") == []


def test_native_stderr_filter_drops_known_noise_and_passes_the_rest():
    code = (
        "import os, sys\nfrom nbutils import quiet\nwith quiet.native_stderr_filtered():\n"
        "    os.write(2, b'I0000 00:00:1.2 123 port.cc:153] oneDNN custom operations are on.\\n')\n"
        "    os.write(2, b'E0000 00:00:1.6 51 cuda_dnn.cc:8579] Unable to register cuDNN factory: Attempting to register factory\\n')\n"
        "    os.write(2, b'a real problem\\n')\n"
        "    os.write(2, b'normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity normalization.\\n')\n"
        "print('after', file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "a real problem\nafter\n", done.stderr


def test_progress_lines_print_each_quarter_once(capsys, monkeypatch):
    from nbutils import progress

    monkeypatch.setenv("NBUTILS_PROGRESS", "lines")
    assert not progress.widgets_available()
    bar = progress.bar(200, "generating", "row")
    for _ in range(10):
        bar.update(20)
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    # batches of 20: a line at the first update past each quarter
    assert [line.split(",")[0] for line in lines] == [
        "generating: 60/200 rows (30%)",
        "generating: 100/200 rows (50%)",
        "generating: 160/200 rows (80%)",
        "generating: 200/200 rows (100%)",
    ]
    silent = progress.bar(10, "training", "update", enabled=False)
    silent.update(10)
    assert capsys.readouterr().out == ""

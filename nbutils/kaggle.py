"""Kaggle kernels from one config: ``python -m nbutils.kaggle render`` and ``python -m
nbutils.kaggle bundle``.

The top-level ``kaggle-metadata.json`` is the one file a user edits. ``render`` writes
``build/kaggle/<kernel>/`` (a ``kernel-metadata.json`` and its notebook) for a ``run_all`` kernel
and for each notebook; ``bundle`` writes ``build/kaggle/code/``, the Kaggle dataset that carries
``nbutils``, the notebooks and wheels of the few packages the Kaggle image lacks. Both check what
they write against the Kaggle CLI's rules (:func:`check_kernel_metadata`,
:func:`check_dataset_metadata`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill as pm

from nbutils import config, files, models, paths, pipeline, prompts

CONFIG = paths.REPO_ROOT / "kaggle-metadata.json"
KAGGLE_DIR = paths.BUILD_DIR / "kaggle"
REQUIREMENTS = paths.REPO_ROOT / "requirements-kaggle.txt"
PINNED = paths.REPO_ROOT / "requirements.txt"
PLACEHOLDER = "YOUR_KAGGLE_USERNAME"
SWEEP_STEPS = 100  # notebook 05's kernel: updates per configuration of its grid
IMAGE_PYTHON = "3.12"  # the Kaggle image's Python, for the bundled wheels
# Model families the image's keras-hub (0.26, tests/kaggle-image-packages.txt) lacks. For them the
# code dataset also ships our pinned keras-hub and keras (pure Python), installed without their
# dependencies so the image's jax and TensorFlow stay as they are; `make test-all` runs the tiny
# Gemma 4 through the series on the image's stack with these two on top.
NEWER_STACK = ("keras-hub", "keras")
STACK_REQUIREMENTS = "requirements-kaggle-stack.txt"
# accelerator -> (enable_gpu, enable_tpu, machine_shape, pipeline profile). Each name says what
# the session gets; the shapes are the ones the Kaggle CLI's help names (`kaggle kernels push
# --help`: "'NvidiaTeslaT4' for GPU T4 x2 or 'TpuV5E8' for TPU v5e-8"; a test reads the installed
# CLI's help). P100 is retired (the CLI swaps it for the T4s), so it is not offered.
ACCELERATORS = {
    "gpu-t4x2": (True, False, "NvidiaTeslaT4", "kaggle"),
    "tpu-v5e-8": (False, True, "TpuV5E8", "kaggle-tpu"),
    "cpu": (False, False, None, "kaggle-cpu"),
}
RENAMED_ACCELERATORS = {"gpu-t4": "gpu-t4x2"}  # Kaggle's T4 sessions have two T4s
CONFIG_KEYS = {"username", "slug_prefix", "accelerator", "model", "profile", "internet", "private"}
PROFILE_FROM_ACCELERATOR = ""  # kaggle-metadata.json's "profile": "" = the accelerator's

# The Kaggle CLI's rules (kaggle 2.2, kaggle/api/kaggle_api_extended.py: kernels_push,
# validate_kernel_string, dataset_create_new), written here so that a rendered file breaking one
# fails a test. The CLI only warns when the title does not slug to the id, and does not restrict the
# slug's characters; we require both.
LANGUAGES = {"python", "r", "rmarkdown"}
KERNEL_TYPES = {"script", "notebook"}
SLUG = re.compile(r"^[a-z0-9][a-z0-9-]*[a-z0-9]$")  # the id's part after "owner/"
MIN_TITLE, MIN_KERNEL_SLUG, MIN_DATASET, MAX_SLUG = 5, 5, 6, 50
# model: …/variation/<int version>
SOURCE_PARTS = {"dataset_sources": 2, "kernel_sources": 2, "model_sources": 5}


class KaggleConfigError(ValueError):
    """A kaggle-metadata.json value that cannot work, with what to set instead."""


def slugify(title: str) -> str:
    """Kaggle's slug of a title: lower case, runs of other characters turned into one hyphen."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def read_config(path: Path = CONFIG, username: str = "") -> dict:
    """The user's Kaggle settings, checked; ``username`` (or ``$KAGGLE_USERNAME``) fills the
    placeholder."""
    try:
        cfg = files.read_json(path)
    except ValueError as exc:
        raise KaggleConfigError(
            f"{path.name}: not valid JSON ({exc}); compare it with the README's example."
        ) from None
    unknown, missing = set(cfg) - CONFIG_KEYS - {"_help"}, CONFIG_KEYS - set(cfg)
    if unknown or missing:
        raise KaggleConfigError(
            f"{path.name}: unknown key(s) {sorted(unknown)}, missing {sorted(missing)}; "
            f"the keys are {sorted(CONFIG_KEYS)}."
        )
    cfg["username"] = (
        username
        or (cfg["username"] if cfg["username"] != PLACEHOLDER else "")
        or os.environ.get("KAGGLE_USERNAME", "")
    )
    if not cfg["username"]:
        raise KaggleConfigError(
            f'{path.name}: set "username" to your Kaggle user name (or pass --username).'
        )
    if cfg["accelerator"] in RENAMED_ACCELERATORS:
        raise KaggleConfigError(
            f"{path.name}: accelerator {cfg['accelerator']!r}: Kaggle's T4 sessions have two T4s; "
            f"set {RENAMED_ACCELERATORS[cfg['accelerator']]!r}."
        )
    if cfg["accelerator"] not in ACCELERATORS:
        raise KaggleConfigError(
            f"{path.name}: accelerator {cfg['accelerator']!r} is unknown; use one of {', '.join(ACCELERATORS)}."
        )
    for key in ("internet", "private"):
        if not isinstance(cfg[key], bool):
            raise KaggleConfigError(
                f"{path.name}: {key!r} must be true or false (JSON booleans, no quotes)."
            )
    if not SLUG.match(cfg["slug_prefix"]):
        raise KaggleConfigError(
            f"{path.name}: slug_prefix {cfg['slug_prefix']!r} may hold only lower-case letters, digits and hyphens."
        )
    model_handle(cfg["model"])  # fails early for a model Kaggle cannot attach
    kaggle_profiles = [p for p in pipeline.PROFILES if p.startswith("kaggle")]
    if cfg["profile"] not in (PROFILE_FROM_ACCELERATOR, *kaggle_profiles):
        raise KaggleConfigError(
            f'{path.name}: profile {cfg["profile"]!r} is not a Kaggle profile; use "" (the '
            f"accelerator's) or one of {', '.join(kaggle_profiles)}."
        )
    if (
        pipeline.PROFILES[profile_of(cfg)].values.get("REQUIRE_ACCELERATOR")
        and cfg["accelerator"] == "cpu"
    ):
        raise KaggleConfigError(
            f'{path.name}: profile {cfg["profile"]!r} needs an accelerator; set "accelerator" '
            "to gpu-t4x2 or tpu-v5e-8."
        )
    return cfg


def profile_of(cfg: dict) -> str:
    """The pipeline profile the kernels run: the config's, or the accelerator's (its Gemma 4
    variant for a Gemma 4 model, where there is one)."""
    if cfg.get("profile"):
        return cfg["profile"]
    profile = ACCELERATORS[cfg["accelerator"]][3]
    variant = f"{profile}-gemma4"
    return variant if needs_newer_stack(cfg["model"]) and variant in config.PROFILES else profile


def model_handle(model: str) -> str:
    """The ``owner/model/framework/variation/version`` that attaches a keras-hub preset on
    Kaggle."""
    handle = models.kaggle_handle(model)
    if handle.count("/") != 4:
        known = ", ".join(n for n in models.known_presets() if n.startswith("gemma"))
        raise KaggleConfigError(
            f"kaggle-metadata.json: model {model!r} is not a keras-hub preset on Kaggle; use one of "
            f"{known}, or a versioned 'kaggle://<owner>/<model>/keras/<variation>/<version>'."
        )
    return handle


def kernel_metadata(
    cfg: dict, slug: str, title: str, code_file: str, kernel_sources: list[str]
) -> dict:
    """One kernel's ``kernel-metadata.json``."""
    gpu, tpu, shape, _ = ACCELERATORS[cfg["accelerator"]]
    meta = {
        "id": f"{cfg['username']}/{slug}",
        "title": title,
        "code_file": code_file,
        "language": "python",
        "kernel_type": "notebook",
        "is_private": cfg["private"],
        "enable_gpu": gpu,
        "enable_tpu": tpu,
        "enable_internet": cfg["internet"],
        "dataset_sources": [f"{cfg['username']}/{code_slug(cfg)}"],
        "competition_sources": [],
        "kernel_sources": kernel_sources,
        "model_sources": [model_handle(cfg["model"])],
    }
    if shape:
        meta["machine_shape"] = shape
    return meta


def code_slug(cfg: dict) -> str:
    """Slug of the code dataset."""
    return f"{cfg['slug_prefix']}-code"


def check_kernel_metadata(meta: dict, folder: Path) -> None:
    """Raise if ``meta`` breaks a rule ``kaggle kernels push`` applies."""
    owner, _, slug = meta["id"].partition("/")
    problems = []
    if not owner or not SLUG.match(slug) or not MIN_KERNEL_SLUG <= len(slug) <= MAX_SLUG:
        problems.append(
            f"id {meta['id']!r} must be owner/slug ({MIN_KERNEL_SLUG}-{MAX_SLUG} lower-case letters, digits, hyphens)"
        )
    if len(meta.get("title", "")) < MIN_TITLE or slugify(meta["title"]) != slug:
        problems.append(
            f"title {meta.get('title')!r} must be ≥ {MIN_TITLE} characters and slug to {slug!r}"
        )
    if meta.get("language") not in LANGUAGES or meta.get("kernel_type") not in KERNEL_TYPES:
        problems.append("language/kernel_type invalid")
    if (
        not (folder / meta.get("code_file", "")).is_file()
        or Path(meta.get("code_file", "/")).is_absolute()
    ):
        problems.append(f"code_file {meta.get('code_file')!r} is not a file relative to {folder}")
    for key in ("is_private", "enable_gpu", "enable_tpu", "enable_internet"):
        if not isinstance(meta.get(key), bool):
            problems.append(f"{key} must be true or false")
    for key, parts in SOURCE_PARTS.items():
        for source in meta.get(key, []):
            bits = source.split("/")
            if (
                len(bits) != parts
                or not all(bits)
                or (key == "model_sources" and not bits[-1].isdigit())
            ):
                problems.append(
                    f"{key} entry {source!r} must have {parts} parts"
                    + (", the last an integer version" if parts == 5 else "")
                )
    if meta["enable_gpu"] and meta["enable_tpu"]:
        problems.append("enable_gpu and enable_tpu cannot both be true")
    if problems:
        raise KaggleConfigError(f"{folder / 'kernel-metadata.json'}: " + "; ".join(problems))


def check_dataset_metadata(meta: dict) -> None:
    """Raise if ``meta`` breaks a rule ``kaggle datasets create`` applies."""
    owner, _, slug = meta.get("id", "").partition("/")
    title = meta.get("title", "")
    if (
        not owner
        or not SLUG.match(slug)
        or not MIN_DATASET <= len(slug) <= MAX_SLUG
        or not MIN_DATASET <= len(title) <= MAX_SLUG
    ):
        raise KaggleConfigError(
            f"dataset-metadata.json: id {meta.get('id')!r} / title {meta.get('title')!r} invalid (6-50 characters, slug)."
        )
    if not meta.get("licenses"):
        raise KaggleConfigError("dataset-metadata.json: licenses must name one license.")


def run_all_notebook(profile: str, overrides: dict) -> nbformat.NotebookNode:
    """The ``run_all`` kernel: the setup cell, then the pipeline 01 -> 04 in one session."""
    cells = nbformat.read(
        paths.NOTEBOOKS_DIR / f"{pipeline.NOTEBOOKS[0]}.ipynb", as_version=4
    ).cells
    # the setup cell every notebook starts with
    setup = next(c for c in cells if c.cell_type == "code")
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell(
                "# Gemma LoRA fine-tuning with keras-hub on JAX: the whole series\n\n"
                f"Runs notebooks {', '.join(pipeline.PROFILES[profile].series)} in order with "
                f"papermill (profile `{profile}`). "
                "The executed notebooks, adapter, plots and `report.md` land in `/kaggle/working/runs/<run_id>/`, "
                "kept as this kernel's output."
            ),
            nbformat.v4.new_code_cell(setup.source),
            nbformat.v4.new_code_cell(
                "from IPython.display import Markdown, display\n\nfrom nbutils import pipeline\n\n"
                f"summary = pipeline.run({profile!r}, {overrides!r})\n"
                "display(Markdown(open(summary['report']).read()))"
            ),
        ]
    )
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb


def kernel_title(cfg: dict, name: str) -> str:
    """A kernel's title (its slug is the id): the slug prefix and the notebook's name in words."""
    words = "all notebooks" if name == "run_all" else name[:2] + " " + name[3:].replace("_", " ")
    return f"{cfg['slug_prefix'].replace('-', ' ')} {words}"


def render(cfg: dict, out: Path = KAGGLE_DIR) -> list[Path]:
    """Write a ``run_all`` kernel and one kernel per notebook (with the profile's parameters
    injected and the notebooks it needs as ``kernel_sources``); returns the folders."""

    profile = profile_of(cfg)
    overrides = {"MODEL": cfg["model"]}
    params = {**pipeline.notebook_parameters(profile, overrides), "RUN_ID": "kaggle"}
    ids = {
        name: f"{cfg['username']}/{slugify(kernel_title(cfg, name))}"
        for name in ("run_all", *pipeline.NOTEBOOKS)
    }
    written = []
    for name in ids:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        with files.atomic_path(folder / f"{name}.ipynb") as tmp:
            if name == "run_all":
                files.write_text(tmp, nbformat.writes(run_all_notebook(profile, overrides)))
            else:
                pm.execute_notebook(
                    str(paths.NOTEBOOKS_DIR / f"{name}.ipynb"),
                    str(tmp),
                    prepare_only=True,
                    parameters=pipeline.for_notebook(kernel_parameters(params, name), name),
                    progress_bar=False,
                )
                files.write_text(tmp, nbformat.writes(without_local_paths(nbformat.read(tmp, 4))))
        series = pipeline.SWEEP_SERIES if name == pipeline.SWEEP_SERIES[-1] else pipeline.SERIES
        needs = [ids[n] for n in series[: series.index(name)]] if name in series else []
        meta = kernel_metadata(
            cfg, ids[name].split("/", 1)[1], kernel_title(cfg, name), f"{name}.ipynb", needs
        )
        files.write_json(folder / "kernel-metadata.json", meta)
        check_kernel_metadata(meta, folder)
        written.append(folder)
    return written


def without_local_paths(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A rendered notebook whose papermill metadata names files, not this machine's folders."""
    meta = nb.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if meta.get(key):
            meta[key] = Path(meta[key]).name.removeprefix(".").split(".ipynb")[0] + ".ipynb"
    return nb


def kernel_parameters(params: dict, name: str) -> dict:
    """A kernel's parameters: the profile's; notebook 05's grid gets a budget per configuration
    (``SWEEP_STEPS``) where the profile trains whole epochs."""
    if name == "05_experiments" and not params.get("MAX_STEPS"):
        return {**params, "MAX_STEPS": SWEEP_STEPS}
    return params


def requirements() -> list[str]:
    """The packages the Kaggle image lacks (``requirements-kaggle.txt``, comments dropped)."""
    lines = (line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines())
    return [line for line in lines if line]


def needs_newer_stack(model: str) -> bool:
    """Whether ``model`` is of a family the image's keras-hub cannot build (Gemma 4)."""
    return prompts.is_gemma4(model)


def stack_requirements() -> list[str]:
    """Our pins of keras-hub and keras (from ``requirements.txt``)."""
    lines = (line.split("#")[0].strip() for line in PINNED.read_text().splitlines())
    pins = [line for line in lines if line.split("==")[0].split("[")[0] in NEWER_STACK]
    if len(pins) != len(NEWER_STACK):
        raise KaggleConfigError(f"{PINNED}: expected pins of {', '.join(NEWER_STACK)}.")
    return pins


def download_wheels(requirements: list[str], folder: Path) -> None:
    """The wheels of ``requirements`` for the image's Python, without their dependencies (the image
    has them: tests/test_kaggle.py checks)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            IMAGE_PYTHON,
            "--platform",
            "manylinux_2_28_x86_64",
            "-d",
            str(folder),
            *requirements,
        ],
        check=True,
    )


def bundle(cfg: dict, out: Path = KAGGLE_DIR / "code", wheels: bool = True) -> Path:
    """Write the code dataset: ``nbutils``, the notebooks, ``requirements-kaggle.txt`` and its
    wheels."""
    with files.atomic_dir(out) as tmp:
        shutil.copytree(
            paths.REPO_ROOT / "nbutils",
            tmp / "nbutils",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        (tmp / "notebooks").mkdir()
        for name in pipeline.NOTEBOOKS:
            shutil.copy2(paths.NOTEBOOKS_DIR / f"{name}.ipynb", tmp / "notebooks")
        shutil.copy2(REQUIREMENTS, tmp / REQUIREMENTS.name)
        # beside the zipped folders, where every notebook's setup cell finds it
        shutil.copy2(paths.REPO_ROOT / "nbutils" / "kaggle_setup.py", tmp / "kaggle_setup.py")
        (tmp / "wheels").mkdir()
        stack = stack_requirements() if needs_newer_stack(cfg["model"]) else []
        if stack:
            (tmp / STACK_REQUIREMENTS).write_text("\n".join(stack) + "\n")
        if wheels and requirements() + stack:
            download_wheels(requirements() + stack, tmp / "wheels")
        title = f"{cfg['slug_prefix'].replace('-', ' ')} code"
        meta = {
            "title": title,
            "id": f"{cfg['username']}/{code_slug(cfg)}",
            "licenses": [{"name": "apache-2.0"}],
        }
        check_dataset_metadata(meta)
        files.write_json(tmp / "dataset-metadata.json", meta)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description="Kaggle kernels and the code dataset, from kaggle-metadata.json."
    )
    parser.add_argument("command", choices=["render", "bundle"])
    parser.add_argument(
        "--username", default="", help="your Kaggle user name (default: from kaggle-metadata.json)"
    )
    parser.add_argument(
        "--no-wheels", action="store_true", help="bundle without downloading wheels"
    )
    args = parser.parse_args(argv)
    try:
        cfg = read_config(username=args.username)
        if args.command == "render":
            for folder in render(cfg):
                print(
                    f"{folder}: {json.loads((folder / 'kernel-metadata.json').read_text())['id']}"
                )
        else:
            print(bundle(cfg, wheels=not args.no_wheels))
    # one line, no traceback
    except (KaggleConfigError, OSError, subprocess.CalledProcessError) as exc:
        print(f"kaggle {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Paths built from the repository root (never from the current directory); on Kaggle, outputs go
under ``/kaggle/working`` (the only folder Kaggle keeps)."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ON_KAGGLE = bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE"))  # set by every Kaggle notebook session
WORK_ROOT = Path("/kaggle/working") if ON_KAGGLE else REPO_ROOT  # where a run's outputs are written
DATA_DIR = REPO_ROOT / "data"
# Tests point these elsewhere (the notebook kernels inherit the environment).
PROCESSED_DIR = Path(os.environ.get("NBUTILS_PROCESSED_DIR") or WORK_ROOT / "data" / "processed")
RUNS_DIR = Path(os.environ.get("NBUTILS_RUNS_DIR") or WORK_ROOT / "runs")
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
BUILD_DIR = REPO_ROOT / "build"
# Kaggle's attached inputs (tests point it elsewhere)
KAGGLE_INPUT = Path(os.environ.get("NBUTILS_KAGGLE_INPUT") or "/kaggle/input")


def kaggle_input(ref: str) -> list[Path]:
    """Where Kaggle mounts an attached input ``<owner>/<slug>`` (either layout) that exists."""
    owner, _, slug = ref.partition("/")
    if not owner or not slug or "/" in slug:
        return []
    found = [KAGGLE_INPUT / slug, *KAGGLE_INPUT.glob(f"*/{owner}/{slug}")]
    return [p for p in found if p.is_dir()]


def cache_dir() -> Path:
    """Folder for converted models and downloads: ``$NBUTILS_CACHE`` or ``~/.cache/nbutils``."""
    root = os.environ.get("NBUTILS_CACHE") or Path.home() / ".cache" / "nbutils"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve(path: str | os.PathLike) -> Path:
    """A user path: absolute as given, relative ones taken from the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()

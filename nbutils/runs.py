"""The run folder ``runs/<run_id>/`` that notebooks 02-04 and the pipeline share."""

from __future__ import annotations

from pathlib import Path

from nbutils import files, paths

STEP_FILES = {
    "02_baseline_inference": "baseline_metrics.json",
    "03_lora_finetune": "adapter.json",
    "04_evaluate": "metrics.json",
    "05_experiments": "sweep_choice.json",
    "06_export": "export/export_verification.json",
}


def run_dir(run_id: str) -> Path:
    """``runs/<run_id>`` under the repository root (created if needed)."""
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise ValueError(
            f"RUN_ID={run_id!r}: use a plain folder name such as 'manual' or '2026-11-28_cpu'."
        )
    folder = paths.RUNS_DIR / run_id
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def read_step_output(run_id: str, notebook: str) -> dict:
    """The JSON a previous notebook wrote, or an error saying which notebook to run first."""
    path = paths.RUNS_DIR / run_id / STEP_FILES[notebook]
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run notebooks/{notebook}.ipynb first with RUN_ID={run_id!r}."
        )
    return files.read_json(path)

"""Run notebooks 01 -> 04 with papermill: ``python -m nbutils.pipeline --profile cpu [-p KEY VALUE ...]``.

Each run gets a fresh ``runs/<run_id>/`` with the executed notebooks, a log, ``config.json`` and all
artifacts; the path of ``report.md`` is printed at the end.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import sys
import time

from nbutils import paths, provenance, runs

NOTEBOOKS = ("01_prepare_data", "02_baseline_inference", "03_lora_finetune", "04_evaluate")

PROFILES: dict[str, dict] = {
    # A few dozen rows, the tiny random model, a handful of steps: checks the plumbing (tests, CI).
    "smoke": dict(MODEL="tiny", SEQUENCE_LENGTH=192, MAX_SOURCE_TOKENS=128, MAX_TRAIN=24, MAX_VAL=8, MAX_TEST=8,
                  MAX_STEPS=4, EVAL_EVERY=2, BATCH_SIZE=4, MAX_NEW_TOKENS=8, GEN_BATCH_SIZE=4, N_BOOTSTRAP=200),
    # The real embedded Gemma 3 270M on the built-in task, capped to fit a 2-core CPU in under 25 minutes.
    "cpu": dict(MODEL="gemma3_270m_local", SEQUENCE_LENGTH=160, MAX_SOURCE_TOKENS=112, MAX_TRAIN=800, MAX_VAL=48,
                MAX_TEST=200, RANK=8, LORA_TARGETS="all", LEARNING_RATE=5e-4, MAX_STEPS=125, BATCH_SIZE=4,
                EVAL_EVERY=25, WARMUP_STEPS=10, MAX_NEW_TOKENS=40, GEN_BATCH_SIZE=20),
    # Alpaca-format instruction data (the shared demo file, or your own via -p DATA_PATH ...).
    "alpaca": dict(MODEL="gemma3_270m_local", DATA_PATH="../shared/data/alpaca_en_demo.json", DATASET="alpaca_en_demo",
                   SEQUENCE_LENGTH=192, MAX_TRAIN=400, MAX_VAL=32, MAX_TEST=60, LORA_TARGETS="all", LEARNING_RATE=5e-4,
                   MAX_STEPS=60, BATCH_SIZE=4, EVAL_EVERY=20, MAX_NEW_TOKENS=96, GEN_BATCH_SIZE=20),
    # A keras-hub preset on a Kaggle GPU/TPU, full built-in data, several epochs.
    "kaggle": dict(MODEL="gemma3_1b", SEQUENCE_LENGTH=256, RANK=16, LORA_TARGETS="all", BATCH_SIZE=16, EPOCHS=3,
                   EVAL_EVERY=50, MAX_NEW_TOKENS=48, GEN_BATCH_SIZE=64),
}  # fmt: skip


def parse_value(text: str):
    """A -p value as a Python literal when it is one (3, 0.1, True, {...}), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def notebook_parameters(profile: str, overrides: dict) -> dict:
    """Profile values with command-line overrides applied."""
    if profile not in PROFILES:
        raise SystemExit(f"--profile {profile!r} is unknown; choose one of {', '.join(PROFILES)}.")
    params = {**PROFILES[profile], **overrides}
    if overrides.get("DATA_PATH") and "DATASET" not in overrides:
        from nbutils import data

        params["DATASET"] = data.dataset_name("", overrides["DATA_PATH"])  # the folder notebook 01 writes
    return params


def new_run_id(profile: str) -> str:
    """A fresh, sortable run id that never reuses a finished run's folder."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_id, n = f"{stamp}_{profile}", 1
    while (paths.RUNS_DIR / run_id).exists():
        n += 1
        run_id = f"{stamp}_{profile}-{n}"
    return run_id


def run(profile: str, overrides: dict, run_id: str | None = None) -> dict:
    """Execute the four notebooks into ``runs/<run_id>/``; returns the run's summary."""
    import papermill as pm

    params = notebook_parameters(profile, overrides)
    run_id = run_id or new_run_id(profile)
    if (paths.RUNS_DIR / run_id / "metrics.json").exists():
        raise SystemExit(f"runs/{run_id} already holds a finished run; pick another --run-id.")
    out = runs.run_dir(run_id)
    params["RUN_ID"] = run_id
    runs.write_json(out / "config.json", {"profile": profile, "parameters": params, "versions": provenance.versions(),
                                          "started": dt.datetime.now().isoformat(timespec="seconds")})  # fmt: skip
    import logging

    logger = logging.getLogger("papermill")  # papermill logs each cell's output as it runs
    for handler in (logging.FileHandler(out / "pipeline.log"), logging.StreamHandler(sys.stdout)):
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    timings = {}
    for name in NOTEBOOKS:
        source = paths.NOTEBOOKS_DIR / f"{name}.ipynb"
        accepted = pm.inspect_notebook(str(source))
        nb_params = {k: v for k, v in params.items() if k in accepted}
        print(f"[{name}] {nb_params}", flush=True)
        start = time.perf_counter()
        pm.execute_notebook(str(source), str(out / f"{name}.ipynb"), parameters=nb_params, cwd=str(paths.NOTEBOOKS_DIR),
                            progress_bar=False, log_output=True, stdout_file=None)  # fmt: skip
        timings[name] = round(time.perf_counter() - start, 1)
        runs.write_json(out / "timings.json", timings)
    summary = {"run_id": run_id, "run_dir": str(out), "report": str(out / "report.md"), "seconds": timings}
    print(f"\nDone in {sum(timings.values()) / 60:.1f} min. Report: {out / 'report.md'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="Run the notebook series 01-04 with papermill.")
    parser.add_argument("--profile", default="cpu", help=f"one of {', '.join(PROFILES)} (default: cpu)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="override a notebook parameter, e.g. -p RANK 16")  # fmt: skip
    parser.add_argument("--run-id", default=None, help="folder name under runs/ (default: timestamp_profile)")
    args = parser.parse_args(argv)
    try:
        run(args.profile, {k: parse_value(v) for k, v in args.parameter}, args.run_id)
    except Exception as exc:  # papermill raises PapermillExecutionError with the cell's error
        print(f"pipeline failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:500]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

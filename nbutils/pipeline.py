"""Run the notebooks with papermill: ``python -m nbutils.pipeline --profile cpu [--params F.json]
[-p KEY VALUE ...]``.

Profiles run 01 -> 04 -> 06; the sweep profiles run 01 -> 02 -> 05. ``--resume RUN_ID`` continues a
run that stopped: finished notebooks are skipped and 03 continues from its last checkpoint.

Each run gets a fresh ``runs/<run_id>/`` with the executed notebooks, a log, ``config.json`` and all
artifacts; the path of ``report.md`` is printed at the end.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as dt
import difflib
import logging
import os
import sys
import time

from nbutils import data, files, paths, provenance, runs

NOTEBOOKS = (
    "01_prepare_data",
    "02_baseline_inference",
    "03_lora_finetune",
    "04_evaluate",
    "05_experiments",
    "06_export",
)
SERIES = (*NOTEBOOKS[:4], NOTEBOOKS[5])  # what a profile runs, unless PROFILE_SERIES says otherwise
SWEEP_SERIES = (NOTEBOOKS[0], NOTEBOOKS[1], NOTEBOOKS[4])

PROFILES: dict[str, dict] = {
    # A few dozen rows, the tiny random model, a handful of steps: checks the plumbing (tests, CI).
    "smoke": dict(
        MODEL="tiny",
        SEQUENCE_LENGTH=192,
        MAX_SOURCE_TOKENS=128,
        MAX_TRAIN=24,
        MAX_VAL=8,
        MAX_TEST=8,
        MAX_STEPS=4,
        EVAL_EVERY=2,
        BATCH_SIZE=4,
        MAX_BATCH_TOKENS=256,
        MAX_NEW_TOKENS=8,
        GEN_BATCH_SIZE=4,
        N_BOOTSTRAP=200,
    ),
    # The real embedded Gemma 3 270M on the built-in task, capped to fit a 2-core CPU in under 25
    # minutes.
    "cpu": dict(
        MODEL="gemma3_270m_local",
        SEQUENCE_LENGTH=160,
        MAX_SOURCE_TOKENS=112,
        MAX_TRAIN=1600,
        MAX_VAL=48,
        MAX_TEST=200,
        RANK=8,
        LORA_TARGETS="all",
        LEARNING_RATE=5e-4,
        MAX_STEPS=400,
        BATCH_SIZE=4,
        MAX_BATCH_TOKENS=192,
        EVAL_EVERY=75,
        WARMUP_STEPS=20,
        MAX_NEW_TOKENS=40,
        GEN_BATCH_SIZE=20,
    ),
    # Alpaca instruction data from the Hugging Face hub (online), or your own file: -p DATA_PATH
    # my.json.
    "alpaca": dict(
        MODEL="gemma3_270m_local",
        DATASET="hf:yahma/alpaca-cleaned",
        SEQUENCE_LENGTH=192,
        MAX_TRAIN=400,
        MAX_VAL=32,
        MAX_TEST=60,
        LORA_TARGETS="all",
        LEARNING_RATE=5e-4,
        MAX_STEPS=60,
        BATCH_SIZE=4,
        EVAL_EVERY=20,
        MAX_NEW_TOKENS=96,
        GEN_BATCH_SIZE=20,
    ),
    # A keras-hub preset on a 16 GB Kaggle T4, full built-in data: batches of 4 x 4 accumulated
    # (bf16 compute,
    # response-only logits), refusing to train on a CPU by mistake.
    "kaggle": dict(
        MODEL="gemma3_1b",
        SEQUENCE_LENGTH=256,
        RANK=16,
        LORA_TARGETS="all",
        BATCH_SIZE=4,
        GRAD_ACCUM=4,
        EPOCHS=2,
        EVAL_EVERY=50,
        MAX_NEW_TOKENS=48,
        GEN_BATCH_SIZE=32,
        REQUIRE_ACCELERATOR=True,
    ),
    # The same on a Kaggle TPU v5e-8: data parallel over its 8 cores, 2 rows each.
    "kaggle-tpu": dict(
        MODEL="gemma3_1b",
        SEQUENCE_LENGTH=256,
        RANK=16,
        LORA_TARGETS="all",
        BATCH_SIZE=16,
        EPOCHS=2,
        EVAL_EVERY=50,
        MAX_NEW_TOKENS=48,
        GEN_BATCH_SIZE=64,
        DISTRIBUTION="data",
        REQUIRE_ACCELERATOR=True,
    ),
}
# A Kaggle session without an accelerator: the cpu profile's budget on the keras-hub preset of the
# same model.
PROFILES["kaggle-cpu"] = {**PROFILES["cpu"], "MODEL": "gemma3_270m"}
# Notebook 05: two configurations of the tiny model (tests, nbval); and the real model on a 2-core
# CPU budget.
PROFILES["sweep-smoke"] = {
    **PROFILES["smoke"],
    "SWEEP": {"rank": [2, 4]},
    "DEFAULT_CONFIG": {"rank": 2, "quantize": "int8"},
    "MAX_STEPS": 3,
    "EVAL_EVERY": 2,
    "N_BOOTSTRAP": 100,
}
PROFILES["sweep-cpu"] = {
    **PROFILES["cpu"],
    "MAX_TRAIN": 1200,
    "MAX_VAL": 32,
    "MAX_TEST": 100,
    "SWEEP": {"rank": [2, 8, 32], "targets": ["query,value", "all"]},
    "DEFAULT_CONFIG": {"rank": 8, "targets": "query,value"},
    "MAX_STEPS": 80,
    "EVAL_EVERY": 40,
    "WARMUP_STEPS": 10,
    "GEN_BATCH_SIZE": 16,
}
PROFILE_SERIES = {"sweep-smoke": SWEEP_SERIES, "sweep-cpu": SWEEP_SERIES}
PURPOSE = {
    "smoke": "plumbing check (used by the tests)",
    "cpu": "the default `make run`",
    "alpaca": "Alpaca-format data",
    "kaggle": "Kaggle T4 GPU (`python -m nbutils.kaggle`)",
    "kaggle-tpu": "Kaggle TPU v5e-8",
    "kaggle-cpu": "Kaggle without an accelerator",
    "sweep-smoke": "notebook 05 plumbing (tests)",
    "sweep-cpu": "notebook 05 on the 2-core CPU (01 → 02 → 05)",
}


def profiles_table() -> str:
    """The README's table of profiles, generated from ``PROFILES`` (a test keeps the README in
    step)."""
    lines = [
        "| profile | model | data (train/val/test rows) | training | what for |",
        "|---|---|---|---|---|",
    ]
    for name, p in PROFILES.items():
        source = (
            f"`{p.get('DATA_PATH') or p['DATASET']}`"
            if p.get("DATA_PATH") or p.get("DATASET")
            else "built-in task"
        )
        caps = "/".join(str(p.get(k) or "all") for k in ("MAX_TRAIN", "MAX_VAL", "MAX_TEST"))
        batch = p.get("BATCH_SIZE", 4) * p.get("GRAD_ACCUM", 1)
        steps = (
            f"{p['MAX_STEPS']} updates" if p.get("MAX_STEPS") else f"{p.get('EPOCHS', 1)} epochs"
        )
        adapter = f"rank {p.get('RANK', 8)} `{p.get('LORA_TARGETS', 'query,value')}`"
        if "SWEEP" in p:
            adapter = "sweep " + " × ".join(
                f"{k} {'/'.join(map(str, v))}" for k, v in p["SWEEP"].items()
            )
        lines.append(
            f"| `{name}` | `{p['MODEL']}` | {source}: {caps} | {steps} of {batch}, {adapter} | {PURPOSE[name]} |"
        )
    return "\n".join(lines)


def accepted_parameters() -> dict[str, list[str]]:
    """Each notebook's papermill parameters."""
    import papermill as pm

    return {
        name: list(pm.inspect_notebook(str(paths.NOTEBOOKS_DIR / f"{name}.ipynb")))
        for name in NOTEBOOKS
    }


def check_parameters(params: dict, accepted: dict[str, list[str]]) -> None:
    """Stop with one line naming any parameter no notebook accepts, and the closest accepted
    names."""
    known = sorted({k for names in accepted.values() for k in names})
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            hint = (
                f"did you mean {', '.join(close)}?" if close else f"accepted: {', '.join(known)}."
            )
            raise SystemExit(f"-p {key}: no notebook has this parameter; {hint}")


def for_notebook(params: dict, accepted: list[str]) -> dict:
    """The parameters one notebook takes (the others belong to other notebooks of the series)."""
    return {k: v for k, v in params.items() if k in accepted}


def parse_value(text: str):
    """A -p value as a Python literal when it is one (3, 0.1, True, {...}), else the string
    itself."""
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
        # the folder notebook 01 writes
        params["DATASET"] = data.dataset_name("", overrides["DATA_PATH"])
    return params


def params_file(path: str) -> dict:
    """Parameters from a JSON object file (``--params``), with a one-line error for anything
    else."""
    try:
        params = files.read_json(paths.resolve(path))
    except (OSError, ValueError) as exc:
        raise SystemExit(
            f"--params {path}: cannot read a JSON object ({type(exc).__name__}: {exc})."
        ) from None
    if not isinstance(params, dict):
        raise SystemExit(
            f'--params {path}: expected a JSON object of parameters, e.g. {{"RANK": 4}}.'
        )
    return params


def new_run_id(profile: str) -> str:
    """A fresh, sortable run id that never reuses a finished run's folder."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_id, n = f"{stamp}_{profile}", 1
    while (paths.RUNS_DIR / run_id).exists():
        n += 1
        run_id = f"{stamp}_{profile}-{n}"
    return run_id


@contextlib.contextmanager
def papermill_log(path):
    """Send papermill's log (each cell's output as it runs) to ``path`` and stdout for the
    duration."""
    logger = logging.getLogger("papermill")
    handlers = [logging.FileHandler(path), logging.StreamHandler(sys.stdout)]
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


def run(profile: str, overrides: dict, run_id: str | None = None) -> dict:
    """Execute the profile's notebooks into ``runs/<run_id>/``; returns the run's summary."""
    accepted = accepted_parameters()
    check_parameters(overrides, accepted)
    params = notebook_parameters(profile, overrides)
    run_id, series = run_id or new_run_id(profile), PROFILE_SERIES.get(profile, SERIES)
    # metrics.json: runs from before 06
    finished = [runs.STEP_FILES[series[-1]], *(["metrics.json"] if series == SERIES else [])]
    if any((paths.RUNS_DIR / run_id / f).exists() for f in finished):
        raise SystemExit(
            f"runs/{run_id} already holds a finished run; pick another --run-id (or --resume {run_id})."
        )
    out = runs.run_dir(run_id)
    params["RUN_ID"] = run_id
    files.write_json(
        out / "config.json",
        {
            "profile": profile,
            "parameters": params,
            "versions": provenance.versions(),
            "machine": provenance.machine(),
            "started": dt.datetime.now().isoformat(timespec="seconds"),
        },
    )
    return execute(run_id, series, params, accepted, {})


def resume(run_id: str) -> dict:
    """Continue ``runs/<run_id>``: skip the notebooks that finished, continue 03 from its latest
    checkpoint."""
    config_path = paths.RUNS_DIR / run_id / "config.json"
    if not config_path.exists():
        raise SystemExit(
            f"--resume {run_id}: {config_path} not found; the run ids are the folders under {paths.RUNS_DIR}."
        )
    config = files.read_json(config_path)
    series = PROFILE_SERIES.get(config["profile"], SERIES)
    # a notebook's time is written when it succeeded
    timings_path = paths.RUNS_DIR / run_id / "timings.json"
    done = files.read_json(timings_path) if timings_path.exists() else {}
    if all(name in done for name in series):
        raise SystemExit(f"runs/{run_id} is finished; nothing to resume.")
    print(f"resuming {run_id}: done {', '.join(done) or 'nothing'}", flush=True)
    return execute(
        run_id, series, {**config["parameters"], "RESUME": True}, accepted_parameters(), done
    )


def execute(run_id: str, series: tuple, params: dict, accepted: dict, done: dict) -> dict:
    """Run the notebooks of ``series`` not in ``done`` (name -> seconds) into ``runs/<run_id>/``."""
    import papermill as pm

    # the kernels inherit it: plain progress lines in saved outputs
    os.environ.setdefault("NBUTILS_PROGRESS", "lines")
    out, timings = paths.RUNS_DIR / run_id, dict(done)
    with papermill_log(out / "pipeline.log"):
        for name in series:
            if name in done:
                continue
            nb_params = for_notebook(params, accepted[name])
            print(f"[{name}] {nb_params}", flush=True)
            start = time.perf_counter()
            pm.execute_notebook(
                str(paths.NOTEBOOKS_DIR / f"{name}.ipynb"),
                str(out / f"{name}.ipynb"),
                parameters=nb_params,
                cwd=str(paths.NOTEBOOKS_DIR),
                progress_bar=False,
                log_output=True,
                stdout_file=None,
            )
            timings[name] = round(time.perf_counter() - start, 1)
            files.write_json(out / "timings.json", timings)
    report = out / ("sweep_report.md" if series == SWEEP_SERIES else "report.md")
    summary = {"run_id": run_id, "run_dir": str(out), "report": str(report), "seconds": timings}
    print(f"\nDone in {sum(timings.values()) / 60:.1f} min. Report: {report}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description="Run the notebook series (01-04 and 06, or 01, 02, 05 for sweeps) with papermill."
    )
    parser.add_argument(
        "--profile", default="cpu", help=f"one of {', '.join(PROFILES)} (default: cpu)"
    )
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="override a notebook parameter, e.g. -p RANK 16",
    )
    parser.add_argument(
        "--params",
        default=None,
        metavar="FILE",
        help="a JSON object of parameters, e.g. a sweep's sweep_choice.json (-p wins over it)",
    )
    parser.add_argument(
        "--run-id", default=None, help="folder name under runs/ (default: timestamp_profile)"
    )
    parser.add_argument(
        "--resume",
        default=None,
        metavar="RUN_ID",
        help="continue a run that stopped (same parameters)",
    )
    parser.add_argument(
        "--profiles", action="store_true", help="print the profiles as a Markdown table and exit"
    )
    args = parser.parse_args(argv)
    if args.profiles:
        print(profiles_table())
        return 0
    run_id = None
    try:
        if args.resume:
            resume(args.resume)
            return 0
        overrides = params_file(args.params) if args.params else {}
        overrides.update({k: parse_value(v) for k, v in args.parameter})
        run_id = args.run_id or new_run_id(args.profile if args.profile in PROFILES else "run")
        run(args.profile, overrides, run_id)
    except KeyboardInterrupt:
        print(
            f"pipeline interrupted; continue from the last periodic checkpoint with: python -m nbutils.pipeline --resume "
            f"{args.resume or run_id}",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:  # papermill raises PapermillExecutionError with the cell's error
        print(
            f"pipeline failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:500]}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

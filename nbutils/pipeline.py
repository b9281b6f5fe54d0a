"""Run the notebooks with papermill: ``python -m nbutils.pipeline --profile cpu [--params F.json]
[-p KEY VALUE ...]``.

Profiles run 01 -> 04 -> 06; the sweep profiles run 01 -> 02 -> 05. ``--resume RUN_ID`` continues a
run that stopped: finished notebooks are skipped and 03 continues from its last checkpoint.

Each run gets a fresh ``runs/<run_id>/`` with the executed notebooks, a log, ``config.json`` and all
artifacts; the path of ``report.md`` is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import sys
import tempfile
import time

import papermill as pm
from traitlets.config import Config

from nbutils import config, data, files, paths, provenance, runs

NOTEBOOKS, SERIES, SWEEP_SERIES = config.NOTEBOOKS, config.SERIES, config.SWEEP_SERIES
PROFILES = config.PROFILES


def for_notebook(params: dict, notebook: str) -> dict:
    """The parameters one notebook takes (the others belong to other notebooks of the series)."""
    accepted = config.defaults(notebook)
    return {k: v for k, v in params.items() if k in accepted}


def notebook_parameters(profile: str, overrides: dict) -> dict:
    """Profile values with overrides applied, every value checked against ``config``."""
    if profile not in PROFILES:
        raise SystemExit(f"--profile {profile!r} is unknown; choose one of {', '.join(PROFILES)}.")
    try:
        config.check_all(overrides)
    except config.ParameterError as exc:
        raise SystemExit(f"-p {exc}") from None
    series = PROFILES[profile].series
    taken = {name for notebook in series for name in config.defaults(notebook)}
    for name in overrides.keys() - taken:
        notebooks = ", ".join(config.PARAMS[name].notebooks)
        raise SystemExit(
            f"-p {name}: only notebook(s) {notebooks} take it, and profile {profile!r} runs "
            f"{', '.join(n[:2] for n in series)}; pick a profile that runs them."
        )
    params = {**PROFILES[profile].values, **overrides}
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
    params = notebook_parameters(profile, overrides)
    run_id, series = run_id or new_run_id(profile), PROFILES[profile].series
    if (paths.RUNS_DIR / run_id / runs.STEP_FILES[series[-1]]).exists():
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
    return execute(run_id, series, params, {})


def resume(run_id: str) -> dict:
    """Continue ``runs/<run_id>``: skip the notebooks that finished, continue 03 from its latest
    checkpoint."""
    config_path = paths.RUNS_DIR / run_id / "config.json"
    if not config_path.exists():
        raise SystemExit(
            f"--resume {run_id}: {config_path} not found; the run ids are the folders under {paths.RUNS_DIR}."
        )
    saved = files.read_json(config_path)
    series = PROFILES[saved["profile"]].series
    # a notebook's time is written when it succeeded
    timings_path = paths.RUNS_DIR / run_id / "timings.json"
    done = files.read_json(timings_path) if timings_path.exists() else {}
    if all(name in done for name in series):
        raise SystemExit(f"runs/{run_id} is finished; nothing to resume.")
    print(f"resuming {run_id}: done {', '.join(done) or 'nothing'}", flush=True)
    return execute(run_id, series, {**saved["parameters"], "RESUME": True}, done)


def local_kernel(folder: str) -> dict:
    """papermill options that connect to each kernel over Unix sockets in ``folder`` (a private
    temporary folder) instead of TCP ports on localhost; Windows has no such sockets, and macOS
    takes socket paths of at most 104 characters."""
    if os.name != "posix" or len(folder) > 90:
        return {}
    sockets = {"transport": "ipc", "ip": os.path.join(folder, "kernel")}
    return {"config": Config({"KernelManager": sockets})}


def execute(run_id: str, series: tuple, params: dict, done: dict) -> dict:
    """Run the notebooks of ``series`` not in ``done`` (name -> seconds) into ``runs/<run_id>/``."""

    # the kernels inherit it: plain progress lines in saved outputs
    os.environ.setdefault("NBUTILS_PROGRESS", "lines")
    out, timings = paths.RUNS_DIR / run_id, dict(done)
    with papermill_log(out / "pipeline.log"), tempfile.TemporaryDirectory() as sockets:
        for name in series:
            if name in done:
                continue
            nb_params = for_notebook(params, name)
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
                **local_kernel(sockets),
            )
            timings[name] = round(time.perf_counter() - start, 1)
            files.write_json(out / "timings.json", timings)
    report = out / ("sweep_report.md" if series == SWEEP_SERIES else "report.md")
    summary = {"run_id": run_id, "run_dir": str(out), "report": str(report), "seconds": timings}
    print(f"\nDone in {sum(timings.values()) / 60:.1f} min. Report: {report}")
    return summary


def parameters_help() -> str:
    """Every parameter with its default, notebooks and meaning, for ``--help``."""
    lines = ["parameters (-p NAME VALUE; docs/parameters.md has them all):"]
    for p in config.PARAMS.values():
        lines.append(f"  {p.name} = {p.default!r}  [{','.join(p.notebooks)}]  {p.help}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description="Run the notebook series (01-04 and 06, or 01, 02, 05 for sweeps) with papermill.",
        epilog=parameters_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--profile",
        default="cpu",
        help=f"one of {', '.join(PROFILES)} (default: cpu; see --profiles)",
    )
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="override a parameter, e.g. -p RANK 16 (the list below)",
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
        print(config.profiles_table())
        return 0
    run_id = None
    try:
        if args.resume:
            resume(args.resume)
            return 0
        overrides = params_file(args.params) if args.params else {}
        overrides.update({k: config.parse(k, v) for k, v in args.parameter})
        run_id = args.run_id or new_run_id(args.profile if args.profile in PROFILES else "run")
        run(args.profile, overrides, run_id)
    except config.ParameterError as exc:
        print(f"-p {exc}", file=sys.stderr)
        return 2
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

"""The notebooks: paired sources, no committed outputs, and every notebook executed under nbval
(smoke profiles)."""

import datetime
import json
import os
import subprocess
import sys

import jupytext
import nbformat
import pytest

from nbutils import data, paths, pipeline, runs

NOTEBOOKS = [paths.NOTEBOOKS_DIR / f"{name}.ipynb" for name in pipeline.NOTEBOOKS]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_pair_in_sync_and_clean(nb):
    paired = jupytext.read(nb.with_suffix(".py"))
    committed = jupytext.read(nb)
    assert [c.source for c in committed.cells] == [c.source for c in paired.cells], (
        f"run `make sync` for {nb.name}"
    )
    assert not any(
        c.get("outputs") or c.get("execution_count")
        for c in committed.cells
        if c.cell_type == "code"
    )
    tags = [c.metadata.get("tags", []) for c in committed.cells]
    assert sum("parameters" in t for t in tags) == 1


def prepare(tmp_path, names, params: dict) -> list[str]:
    """Copies of the notebooks with papermill's parameters injected (what nbval then executes)."""
    import papermill as pm

    prepared = []
    for name in names:
        nb = paths.NOTEBOOKS_DIR / f"{name}.ipynb"
        accepted = pm.inspect_notebook(str(nb))
        target = tmp_path / nb.name
        pm.execute_notebook(
            str(nb),
            str(target),
            parameters=pipeline.for_notebook(params, accepted),
            prepare_only=True,
            progress_bar=False,
        )
        prepared.append(str(target))
    return prepared


def nbval(tmp_path, prepared: list[str]) -> subprocess.CompletedProcess:
    """Execute prepared notebooks in order under nbval (--nbval-lax: every cell must run without
    error)."""
    env = {
        **os.environ,
        "NBUTILS_PROCESSED_DIR": str(tmp_path / "processed"),
        "NBUTILS_RUNS_DIR": str(tmp_path / "runs"),
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--nbval-lax",
            "--nbval-cell-timeout=600",
            *prepared,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )


def test_all_notebooks_run_under_nbval(tmp_path, monkeypatch):
    """01 -> 04 -> 06 with the smoke profile's parameters, executed by nbval; Kaggle credentials in
    the environment reach none of the files written."""
    from conftest import FAKE_KAGGLE
    from test_kaggle import secret_leaks

    for name, value in FAKE_KAGGLE.items():
        monkeypatch.setenv(name, value)
    proc = nbval(
        tmp_path,
        prepare(tmp_path, pipeline.SERIES, {**pipeline.PROFILES["smoke"], "RUN_ID": "nbval"}),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = (tmp_path / "runs" / "nbval" / "report.md").read_text()
    assert "| ROUGE-L F1 |" in report
    assert (tmp_path / "runs" / "nbval" / "export" / "export_verification.json").exists()
    assert not secret_leaks(tmp_path, list(FAKE_KAGGLE.values()))


def test_sweep_notebook_runs_under_nbval_and_resumes(tmp_path, monkeypatch):
    """01 -> 02 -> 05 (sweep-smoke) under nbval; a rerun with a larger grid trains only the new
    configuration."""
    import papermill as pm

    params = {**pipeline.PROFILES["sweep-smoke"], "RUN_ID": "sweep"}
    proc = nbval(tmp_path, prepare(tmp_path, pipeline.SWEEP_SERIES, params))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    sweep_dir = tmp_path / "runs" / "sweep" / "sweep"
    first = {d.name: (d / "result.json").stat().st_mtime_ns for d in sweep_dir.iterdir()}
    assert len(first) == 3 and (
        tmp_path / "runs" / "sweep" / "sweep_report.md"
    ).read_text().startswith("# LoRA sweep")
    # the int8 default: trained, then tested on an int8 base
    assert "r2-query+value-lr0.0005-a2-int8" in first
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    params["SWEEP"] = {"rank": [2, 4, 1]}
    nb = prepare(rerun, ["05_experiments"], params)[0]
    # the kernel inherits these
    monkeypatch.setenv("NBUTILS_PROCESSED_DIR", str(tmp_path / "processed"))
    monkeypatch.setenv("NBUTILS_RUNS_DIR", str(tmp_path / "runs"))
    pm.execute_notebook(nb, nb, progress_bar=False, cwd=str(rerun))
    executed = nbformat.read(rerun / "05_experiments.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert printed.count(": training") == 1 and "r1-query+value-lr0.0005-a1: training" in printed
    # finished ones untouched
    assert {d: (sweep_dir / d / "result.json").stat().st_mtime_ns for d in first} == first
    assert len(list(sweep_dir.iterdir())) == 4
    assert (
        len(
            json.loads((tmp_path / "runs" / "sweep" / "sweep_test.json").read_text())["evaluations"]
        )
        == 2
    )


def test_step_before_its_prerequisite_says_which_notebook(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "PROCESSED_DIR", tmp_path / "processed")
    monkeypatch.setattr(paths, "RUNS_DIR", tmp_path / "runs")
    with pytest.raises(FileNotFoundError, match="run notebooks/01_prepare_data.ipynb first"):
        data.load_processed("pycode-summary")
    with pytest.raises(FileNotFoundError, match="run notebooks/02_baseline_inference.ipynb first"):
        runs.read_step_output("r1", "02_baseline_inference")


def test_pipeline_parameters_and_run_ids(tmp_path, monkeypatch):
    assert pipeline.parse_value("16") == 16 and pipeline.parse_value("query,value") == "query,value"
    assert pipeline.parse_value("{'a': 'b'}") == {"a": "b"} and pipeline.parse_value("3e-4") == 3e-4
    p = pipeline.notebook_parameters("cpu", {"DATA_PATH": "my data/rows.jsonl", "RANK": 4})
    assert p["DATASET"] == "rows" and p["RANK"] == 4 and p["MODEL"] == "gemma3_270m_local"
    with pytest.raises(SystemExit, match="--profile 'gpu' is unknown"):
        pipeline.notebook_parameters("gpu", {})
    monkeypatch.setattr(paths, "RUNS_DIR", tmp_path)
    (tmp_path / "done" / "export").mkdir(parents=True)
    (tmp_path / "done" / "export" / "export_verification.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds a finished run"):
        pipeline.run("smoke", {}, run_id="done")

    class FrozenClock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2026, 11, 30, 12, 0, 0)

    monkeypatch.setattr(pipeline.dt, "datetime", FrozenClock)
    first = pipeline.new_run_id("cpu")
    assert first == "20261130-120000_cpu"
    (tmp_path / first).mkdir()
    assert pipeline.new_run_id("cpu") == "20261130-120000_cpu-2"  # never reuses an existing folder


def test_resume_skips_finished_notebooks_and_resumes_training(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "RUNS_DIR", tmp_path)
    with pytest.raises(SystemExit, match="--resume nope: .*config.json not found"):
        pipeline.resume("nope")
    run = tmp_path / "r1"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"profile": "smoke", "parameters": {"RANK": 4, "RUN_ID": "r1"}})
    )
    (run / "timings.json").write_text(
        json.dumps({"01_prepare_data": 1.0, "02_baseline_inference": 2.0})
    )
    calls = []
    monkeypatch.setattr(
        pipeline,
        "execute",
        lambda run_id, series, params, accepted, done: calls.append((series, params, done)),
    )
    pipeline.resume("r1")
    series, params, done = calls[0]
    assert (
        series == pipeline.SERIES
        and params == {"RANK": 4, "RUN_ID": "r1", "RESUME": True}
        and set(done) == {"01_prepare_data", "02_baseline_inference"}
    )
    (run / "timings.json").write_text(json.dumps({name: 1.0 for name in pipeline.SERIES}))
    with pytest.raises(SystemExit, match="runs/r1 is finished; nothing to resume"):
        pipeline.resume("r1")


def test_unknown_parameter_is_refused_with_the_closest_names(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "RUNS_DIR", tmp_path)
    with pytest.raises(
        SystemExit,
        match="-p LERNING_RATE: no notebook has this parameter; did you mean LEARNING_RATE",
    ):
        pipeline.run("smoke", {"LERNING_RATE": 1e-3})
    assert not any(tmp_path.iterdir())  # refused before any run folder was written


def test_every_profile_parameter_is_accepted_by_a_notebook():
    accepted = pipeline.accepted_parameters()
    for name, params in pipeline.PROFILES.items():
        pipeline.check_parameters(params, accepted)  # raises SystemExit naming the key


def test_readme_profile_table_comes_from_the_profiles():
    readme = (paths.REPO_ROOT / "README.md").read_text()
    assert pipeline.profiles_table() in readme, (
        "README's profile table is stale: paste `python -m nbutils.pipeline --profiles`"
    )

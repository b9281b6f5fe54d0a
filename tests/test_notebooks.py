"""The notebooks: paired sources, no committed outputs, and every notebook executed under nbval
(smoke profiles)."""

import ast
import datetime
import json
import os
import subprocess
import sys

import jupytext
import nbformat
import papermill as pm
import pytest
from test_docs import output_problems

from nbutils import config, data, paths, pipeline, runs

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
    prepared = []
    for name in names:
        nb = paths.NOTEBOOKS_DIR / f"{name}.ipynb"
        target = tmp_path / nb.name
        pm.execute_notebook(
            str(nb),
            str(target),
            parameters=pipeline.for_notebook(params, name),
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


def test_the_series_writes_its_report_and_exports_without_secrets(smoke_run):
    """01 -> 04 -> 06 with the smoke profile (one papermill run shared by the fast tier); Kaggle
    credentials in the environment reach none of the files written."""
    from conftest import FAKE_KAGGLE
    from test_kaggle import secret_leaks

    run = smoke_run / "runs" / "smoke"
    assert "| ROUGE-L F1 |" in (run / "report.md").read_text()
    assert (run / "export" / "export_verification.json").exists()
    assert not secret_leaks(smoke_run, list(FAKE_KAGGLE.values()))


def check_gemma4_run(root, run_id: str) -> None:
    """A tiny Gemma 4 series: the instruction-tuned layout recorded by 01, 02 and 03 alike, your
    prompts answered, and the exports checked (GGUF skipped: the port covers Gemma 3)."""
    manifest = json.loads((root / "processed" / "pycode-summary" / "manifest.json").read_text())
    run = root / "runs" / run_id
    baseline = json.loads((run / "baseline_metrics.json").read_text())["settings"]
    adapter = json.loads((run / "adapter.json").read_text())
    for record in (manifest, baseline, adapter):
        assert (record["template"], record["stop_token"]) == ("gemma4", "<turn|>"), record
    predictions = [json.loads(line) for line in (run / "tuned_predictions.jsonl").open()]
    assert all(p["prompt"].startswith("<|turn>user\n") for p in predictions)
    assert all(p["prompt"].endswith("<turn|>\n<|turn>model\n") for p in predictions)
    assert (run / "own_prompts.jsonl").read_text().count("\n") == 1
    verified = json.loads((run / "export" / "export_verification.json").read_text())
    checks = verified["checks"]
    assert {"keras_preset", "transformers", "transformers_tokenizer"} <= set(checks)
    assert all(c["passed"] for c in checks.values()) and "gguf" not in checks, checks


def test_tiny_gemma4_runs_the_series(gemma4_smoke_run):
    check_gemma4_run(gemma4_smoke_run, "gemma4")


def test_every_variant_runs_the_series_and_exports_exactly(gemma4_smoke_run):
    """DoRA + rsLoRA + LoRA+ + NEFTune trained (on the tiny Gemma 4), beam search with a minimum
    length decoded by 02 and 04 alike, and every export of the merged DoRA model passes notebook
    06's checks (GGUF: the merge itself is checked on Gemma 3 in test_variants)."""
    run = gemma4_smoke_run / "runs" / "gemma4"
    adapter = json.loads((run / "adapter.json").read_text())
    assert adapter["dora"] is True and adapter["scaling"] == "rslora"
    assert adapter["config"]["loraplus_ratio"] == 4 and adapter["config"]["neftune_alpha"] == 5
    settings = json.loads((run / "baseline_metrics.json").read_text())["settings"]
    assert (settings["sampler"], settings["min_new_tokens"]) == ("beam:2", 2)
    for name in ("baseline_predictions.jsonl", "tuned_predictions.jsonl"):
        predictions = [json.loads(line) for line in (run / name).open()]
        assert all(p["n_tokens"] >= 2 for p in predictions), name
    checks = json.loads((run / "export" / "export_verification.json").read_text())["checks"]
    assert {"keras_preset", "transformers", "merged_in_memory"} <= set(checks)
    assert all(c["passed"] for c in checks.values()), checks


@pytest.mark.slow
def test_every_notebook_runs_under_nbval(tmp_path, monkeypatch):
    """01 -> 06 executed by nbval in one go: 05 (sweep-smoke's parameters) right after 01 and 02, as
    the sweep series runs it, then 03, 04 and 06 (smoke's) on the same 01/02 outputs; Kaggle
    credentials in the environment reach none of the files written."""
    from conftest import FAKE_KAGGLE
    from test_kaggle import secret_leaks

    for name, value in FAKE_KAGGLE.items():
        monkeypatch.setenv(name, value)
    smoke, sweep = (pipeline.PROFILES[p].values for p in ("smoke", "sweep-smoke"))
    assert all(
        pipeline.for_notebook(smoke, n) == pipeline.for_notebook(sweep, n)
        for n in pipeline.SWEEP_SERIES[:2]
    )
    assert pipeline.SWEEP_SERIES[:2] == pipeline.SERIES[:2]
    order = (*pipeline.SWEEP_SERIES, *pipeline.SERIES[2:])
    prepared = [
        prepare(
            tmp_path,
            [name],
            {**(sweep if name in pipeline.SWEEP_SERIES else smoke), "RUN_ID": "nbval"},
        )[0]
        for name in order
    ]
    proc = nbval(tmp_path, prepared)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    run = tmp_path / "runs" / "nbval"
    assert "| ROUGE-L F1 |" in (run / "report.md").read_text()
    assert (run / "sweep_report.md").exists()
    assert (run / "export" / "export_verification.json").exists()
    assert not secret_leaks(tmp_path, list(FAKE_KAGGLE.values()))


def run_sweep(smoke_run, folder, params: dict) -> str:
    """Notebook 05 with ``params`` on the smoke run's 01/02 outputs; returns what it printed."""
    folder.mkdir(exist_ok=True)
    nb = prepare(folder, ["05_experiments"], {**params, "RUN_ID": "smoke"})[0]
    env = {"NBUTILS_PROCESSED_DIR": "processed", "NBUTILS_RUNS_DIR": "runs"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(smoke_run / v) for k, v in env.items()})  # the kernel inherits them
    try:
        pm.execute_notebook(nb, nb, progress_bar=False, cwd=str(folder))
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert not output_problems(nb), output_problems(nb)  # what a reader of 05 sees, too
    executed = nbformat.read(nb, as_version=4)
    return "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))


SWEEP_CONFIGS = {
    "r2-query+value-lr0.0005-a2",
    "r4-query+value-lr0.0005-a4",
    "r2-query+value-lr0.0005-a2-int8",
    "r2-query+value-lr0.0005-a2-beam2",
}


@pytest.fixture(scope="session")
def sweep_run(smoke_run, tmp_path_factory):
    """Notebook 05 (sweep-smoke) once on the smoke run's data and baseline; returns the run folder
    and each configuration's result time."""
    run_sweep(
        smoke_run, tmp_path_factory.mktemp("sweep"), dict(pipeline.PROFILES["sweep-smoke"].values)
    )
    sweep_dir = smoke_run / "runs" / "smoke" / "sweep"
    return smoke_run, {d.name: (d / "result.json").stat().st_mtime_ns for d in sweep_dir.iterdir()}


def test_sweep_runs_on_the_series_outputs(sweep_run):
    """Two float configurations and the int8 default: trained, chosen, tested on an int8 base; a
    third decodes the first's adapter with beam search, without training it again."""
    smoke_run, first = sweep_run
    run = smoke_run / "runs" / "smoke"
    assert set(first) == SWEEP_CONFIGS
    sweep_dir = run / "sweep"
    greedy, beam = (
        json.loads((sweep_dir / f"r2-query+value-lr0.0005-a2{tag}" / "result.json").read_text())
        for tag in ("", "-beam2")
    )
    assert beam["sampler"] == "beam:2" and beam["train_seconds"] == greedy["train_seconds"]
    assert not (sweep_dir / "r2-query+value-lr0.0005-a2-beam2" / "train_log.csv").exists()
    assert (run / "sweep_report.md").read_text().startswith("# LoRA sweep")
    assert len(json.loads((run / "sweep_test.json").read_text())["evaluations"]) == 1


@pytest.mark.slow
def test_a_larger_grid_trains_only_the_new_configuration(sweep_run, tmp_path):
    smoke_run, first = sweep_run
    params = dict(pipeline.PROFILES["sweep-smoke"].values)
    grid = [{"rank": r, "quantize": ""} for r in (2, 4, 1)]
    printed = run_sweep(smoke_run, tmp_path / "rerun", {**params, "SWEEP": grid})
    assert printed.count(": training") == 1 and "r1-query+value-lr0.0005-a1: training" in printed
    run = smoke_run / "runs" / "smoke"
    sweep_dir = run / "sweep"
    # finished ones untouched
    assert {d: (sweep_dir / d / "result.json").stat().st_mtime_ns for d in first} == first
    assert len(list(sweep_dir.iterdir())) == 5
    assert len(json.loads((run / "sweep_test.json").read_text())["evaluations"]) == 2


def test_step_before_its_prerequisite_says_which_notebook(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "PROCESSED_DIR", tmp_path / "processed")
    monkeypatch.setattr(paths, "RUNS_DIR", tmp_path / "runs")
    with pytest.raises(FileNotFoundError, match="run notebooks/01_prepare_data.ipynb first"):
        data.load_processed("pycode-summary")
    with pytest.raises(FileNotFoundError, match="run notebooks/02_baseline_inference.ipynb first"):
        runs.read_step_output("r1", "02_baseline_inference")


def test_the_pipeline_prints_nothing_on_stderr(smoke_run):
    """The terminal of a run shows its progress only: ipykernel warns on stderr about a kernel on
    TCP ports, so the pipeline connects over Unix sockets."""
    assert (smoke_run / "smoke.stderr").read_text() == ""


def test_kernels_fall_back_to_tcp_where_unix_sockets_cannot_go():
    sockets = pipeline.local_kernel("/tmp/tmpabc")["config"]["KernelManager"]
    assert sockets == {"transport": "ipc", "ip": "/tmp/tmpabc/kernel"}
    assert pipeline.local_kernel("/" + "t" * 100) == {}  # past the socket path limit


def test_pipeline_parameters_and_run_ids(tmp_path, monkeypatch):
    assert config.parse("RANK", "16") == 16 and config.parse("LORA_TARGETS", "all") == "all"
    assert config.parse("COLUMNS", "{'a': 'b'}") == {"a": "b"}
    assert config.parse("LEARNING_RATE", "3e-4") == 3e-4 and config.parse("MODEL", "1") == "1"
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
        lambda run_id, series, params, done: calls.append((series, params, done)),
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


@pytest.mark.parametrize(
    ("name", "text", "complaint"),
    [
        ("RANK", "8.5", r"RANK=8.5: expected int \(default 8\)"),
        ("RANK", "0", r"RANK=0: must be a number >= 1"),
        ("SCHEDULE", "cosin", r"SCHEDULE='cosin': use one of 'cosine', 'linear'"),
        ("RESUME", "yes", r"RESUME='yes': expected bool"),
        ("MAX_STEPS", "True", r"MAX_STEPS=True: expected int, not a bool"),
    ],
)
def test_bad_values_are_refused_in_one_line_before_anything_runs(name, text, complaint):
    with pytest.raises(config.ParameterError, match=complaint):
        config.parse(name, text)
    done = subprocess.run(
        [sys.executable, "-m", "nbutils.pipeline", "--profile", "smoke", "-p", name, text],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr


def test_a_parameter_the_profile_never_runs_is_refused():
    with pytest.raises(SystemExit, match="-p QUANTIZE: only notebook.s. 05 take it"):
        pipeline.notebook_parameters("cpu", {"QUANTIZE": "int8"})
    assert pipeline.notebook_parameters("sweep-cpu", {"QUANTIZE": "int8"})["QUANTIZE"] == "int8"


def test_every_profile_value_fits_its_parameter():
    for profile in pipeline.PROFILES.values():
        config.check_all(profile.values)  # raises naming the parameter


@pytest.mark.parametrize("name", pipeline.NOTEBOOKS)
def test_parameters_cell_is_the_configuration(name):
    """Names, defaults and help of every parameters cell are config.PARAMS' (one owner)."""
    nb = jupytext.read(paths.NOTEBOOKS_DIR / f"{name}.py")
    cell = next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert cell == config.cell(name), "run `python -m nbutils.config --write-cells`, `make sync`"
    inspected = pm.inspect_notebook(str(paths.NOTEBOOKS_DIR / f"{name}.ipynb"))
    assert {k: ast.literal_eval(v["default"]) for k, v in inspected.items()} == config.defaults(
        name
    )


def test_parameters_page_and_help_come_from_the_configuration():
    page = (paths.REPO_ROOT / "docs" / "parameters.md").read_text()
    assert page == config.markdown(), (
        "run `python -m nbutils.config --markdown > docs/parameters.md`"
    )
    done = subprocess.run(
        [sys.executable, "-m", "nbutils.pipeline", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert all(f"  {name} = " in done.stdout for name in config.PARAMS)


def test_the_command_line_loads_no_framework():
    """``python -m nbutils.pipeline --help`` answers at once: no JAX, Keras or TensorFlow."""
    code = "import sys, nbutils.pipeline; print(sorted({m.split('.')[0] for m in sys.modules}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert not {"'jax'", "'keras'", "'tensorflow'"} & set(done.stdout.strip("[]\n").split(", "))

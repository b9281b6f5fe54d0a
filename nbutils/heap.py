"""Give freed heap memory back to the operating system between training steps (glibc's
``malloc_trim``).

XLA's worker threads allocate from glibc's per-thread arenas; blocks they free stay resident, so a
process's memory climbs by a few hundred MB over a pass although nothing is in use. Trimming before
each step keeps the peak at what is in use plus one step's scratch (see
``bench/memory_profile.py``).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    try:
        # the C library's symbols, seen from the running program
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_free_heap() -> bool:
    """Return the C heap's free pages to the operating system; False where this C library cannot."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False

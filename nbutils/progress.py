"""Progress of long loops: a widget bar in interactive Jupyter, compact lines everywhere else.

Saved outputs (papermill runs, CI, rendered pages) get a handful of plain lines instead of a text
bar redrawn with carriage returns; ``NBUTILS_PROGRESS=lines`` (set by the pipeline) forces them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time


def widgets_available() -> bool:
    """Whether a Jupyter widget bar can show: an IPython kernel with ipywidgets, and lines not
    forced."""
    return (
        os.environ.get("NBUTILS_PROGRESS") != "lines"
        and "ipykernel" in sys.modules
        and importlib.util.find_spec("ipywidgets") is not None
    )


class Lines:
    """A progress report as one line at each quarter of the work (and at the end)."""

    def __init__(self, total: int, desc: str, unit: str = "row", steps: int = 4):
        self.total, self.desc, self.unit, self.done, self.start = (
            total,
            desc,
            unit,
            0,
            time.perf_counter(),
        )
        self.marks = sorted({max(1, round(total * k / steps)) for k in range(1, steps + 1)})

    def update(self, n: int = 1) -> None:
        """Advance by ``n``; print a line when a quarter mark is passed."""
        before, self.done = self.done, self.done + n
        if any(before < m <= self.done for m in self.marks):
            elapsed = time.perf_counter() - self.start
            print(
                f"{self.desc}: {self.done}/{self.total} {self.unit}s ({self.done / max(self.total, 1):.0%}), {elapsed:.0f} s",
                flush=True,
            )

    def close(self) -> None:
        """Nothing to tear down (the last line was printed at 100%)."""


def bar(total: int, desc: str, unit: str = "row", enabled: bool = True):
    """A progress object with ``update(n)`` and ``close()``: tqdm's widget in Jupyter, else
    :class:`Lines`."""
    if enabled and widgets_available():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit)
    return Lines(total, desc, unit, steps=4 if enabled else 0)

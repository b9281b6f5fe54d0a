"""Figures the notebooks save as PNG (written atomically) and then display."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _figure():
    """A new figure and axes (notebooks show the saved PNG, so nothing is drawn twice)."""
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(8, 4), constrained_layout=True)


def save(fig, path: Path) -> Path:
    """Save a figure as PNG atomically and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def token_length_histogram(prompt_lens: list[int], target_lens: list[int], sequence_length: int,
                           truncated_share: float, path: Path) -> Path:  # fmt: skip
    """Histogram of prompt and target token lengths with SEQUENCE_LENGTH marked."""
    fig, ax = _figure()
    top = max(max(prompt_lens, default=1), max(target_lens, default=1), sequence_length)
    bins = range(0, top + 8, max(1, top // 50))
    ax.hist(prompt_lens, bins=bins, alpha=0.6, label="prompt (with <bos>)")
    ax.hist(target_lens, bins=bins, alpha=0.6, label="response (with stop token)")
    ax.axvline(sequence_length, color="k", linestyle="--", label=f"SEQUENCE_LENGTH = {sequence_length}")
    ax.set(xlabel="tokens", ylabel="rows", title=f"Token lengths ({truncated_share:.2%} of rows had their prompt truncated)")
    ax.legend()
    return save(fig, path)

"""Figures the notebooks save as PNG (written atomically) and then display."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from nbutils import files


def _figure():
    """A new figure and axes (notebooks show the saved PNG, so nothing is drawn twice)."""

    return plt.subplots(figsize=(8, 4), constrained_layout=True)


def save(fig, path: Path) -> Path:
    """Save a figure as PNG atomically and return its path."""

    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(path)


def token_length_histogram(
    prompt_lens: list[int],
    target_lens: list[int],
    sequence_length: int,
    truncated_share: float,
    path: Path,
) -> Path:
    """Histogram of prompt and target token lengths with SEQUENCE_LENGTH marked."""
    fig, ax = _figure()
    top = max(max(prompt_lens, default=1), max(target_lens, default=1), sequence_length)
    bins = range(0, top + 8, max(1, top // 50))
    ax.hist(prompt_lens, bins=bins, alpha=0.6, label="prompt (with <bos>)")
    ax.hist(target_lens, bins=bins, alpha=0.6, label="response (with stop token)")
    ax.axvline(
        sequence_length, color="k", linestyle="--", label=f"SEQUENCE_LENGTH = {sequence_length}"
    )
    ax.set(
        xlabel="tokens",
        ylabel="rows",
        title=f"Token lengths ({truncated_share:.2%} of rows had their prompt truncated)",
    )
    ax.legend()
    return save(fig, path)


def loss_curve(log_csv: Path, path: Path) -> Path:
    """Train loss per step and validation loss at each evaluation, from ``train_log.csv``."""
    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    fig, ax = _figure()
    steps, losses = [int(r["step"]) for r in rows], [float(r["train_loss"]) for r in rows]
    ax.plot(steps, losses, label="train update (per response token)", alpha=0.35)
    window = min(10, len(losses))
    if window > 1:
        smooth = [
            sum(losses[i - window + 1 : i + 1]) / window for i in range(window - 1, len(losses))
        ]
        ax.plot(steps[window - 1 :], smooth, label=f"train, mean of last {window} updates")
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(
        xlabel="optimizer update", ylabel="loss (nats / response token)", title="LoRA fine-tuning"
    )
    ax.legend()
    return save(fig, path)


def metric_bars(
    comparison: dict, path: Path, metrics: tuple = ("rougeL_f1", "chrf", "exact_match", "stop_rate")
) -> Path:
    """Baseline vs tuned bars per metric, with the tuned bar's paired-bootstrap 95% CI of the
    difference."""

    keys = [m for m in metrics if m in comparison]
    fig, ax = _figure()
    x = np.arange(len(keys))
    base = [comparison[k]["baseline"] for k in keys]
    tuned = [comparison[k]["tuned"] for k in keys]
    err = np.array(
        [
            [
                comparison[k]["diff"] - comparison[k]["ci95"][0],
                comparison[k]["ci95"][1] - comparison[k]["diff"],
            ]
            for k in keys
        ]
    ).T
    ax.bar(x - 0.2, base, 0.4, label="baseline")
    ax.bar(
        x + 0.2, tuned, 0.4, yerr=err, capsize=4, label="LoRA-tuned (error bar: 95% CI of the gain)"
    )
    ax.set_xticks(x, keys)
    ax.set(ylim=(0, 1.05), title="Test-set metrics, baseline vs LoRA")
    ax.legend()
    return save(fig, path)


def sweep_plot(results: list[dict], path: Path) -> Path:
    """Validation ROUGE-L and best validation loss against trainable parameters (log x, one line per
    target set), and the validation loss curves overlaid."""

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for targets, quantize in dict.fromkeys(
        (r["targets"], r.get("quantize") or "") for r in results
    ):
        group = sorted(
            (r for r in results if (r["targets"], r.get("quantize") or "") == (targets, quantize)),
            key=lambda r: r["trainable_params"],
        )
        x, label = (
            [r["trainable_params"] for r in group],
            f"targets {targets}" + (f", {quantize} base" if quantize else ""),
        )
        axes[0].plot(x, [r["val_rougeL_f1"] for r in group], "o-", label=label)
        axes[1].plot(x, [r["best_val_loss"] for r in group], "o-", label=label)
    for r in results:
        axes[2].plot(
            r["val_curve"]["val_step"], r["val_curve"]["val_loss"], "o-", ms=3, label=r["name"]
        )
    axes[0].set(
        xscale="log",
        xlabel="trainable parameters",
        ylabel="ROUGE-L F1 (validation)",
        title="Quality vs adapter size",
    )
    axes[1].set(
        xscale="log",
        xlabel="trainable parameters",
        ylabel="best validation loss",
        title="Loss vs adapter size",
    )
    axes[2].set(xlabel="optimizer update", ylabel="validation loss", title="Validation curves")
    for ax in axes:
        ax.legend(fontsize=7)
    return save(fig, path)

"""What the series does on whatever JAX sees (a GPU, a TPU or the CPU), in one short run.

    .venv/bin/python bench/accelerator_check.py [--model gemma3_270m_local] [--rows 8]
        [--precision auto] [--out FILE]

On the device JAX picks: one LoRA update of the model in float32 and in the policy that
``MIXED_PRECISION`` (``--precision``, default ``auto``) chooses there (the loss of each and their
difference), batched greedy decoding (tokens per second), notebook 06's merge check at full matmul
precision (max |Δlogit| against its default TOLERANCE) and the device's memory in use. Prints one Markdown table; writes JSON
(default ``runs/bench/accelerator_check.json``). The model defaults to the embedded 270M, which
needs no network; the test suite runs it on the tiny random model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import keras
import numpy as np

import nbutils  # noqa: F401  (JAX backend before Keras loads)
from nbutils import (
    batches,
    config,
    devices,
    evaluation,
    export,
    files,
    models,
    paths,
    prompts,
    sequences,
    training,
)

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import optimizer, prepare_rows  # noqa: E402

SEQUENCE_LENGTH, RANK, MAX_NEW_TOKENS = 160, 8, 16
TOLERANCE = config.default("TOLERANCE")  # notebook 06's, before it is narrowed to effect/10


def one_update(model: str, policy: str, rows: list[dict]) -> dict:
    """Loss and seconds of one LoRA update (rank 8, all projections) under ``policy``."""
    keras.mixed_precision.set_global_policy(policy)
    lm = models.load_gemma(model, sequence_length=SEQUENCE_LENGTH, seed=0)
    training.enable_lora(lm, RANK, "all", seed=0)
    trainer = training.Trainer(lm, optimizer(1))
    arrays = sequences.make_arrays(lm.preprocessor.tokenizer, rows, "gemma", SEQUENCE_LENGTH)
    batch = batches.make_batch(arrays, np.arange(len(rows)))
    start = time.perf_counter()
    loss, state = trainer.update([batch], trainer.state())
    trainer.write_back(state)
    return {"lm": lm, "loss": loss, "seconds": round(time.perf_counter() - start, 2)}


def decode(lm, rows: list[dict]) -> dict:
    """Batched greedy decoding of ``rows``: tokens per second (compilation included)."""
    start = time.perf_counter()
    answers = evaluation.generate(
        lm, rows, prompts.Template("gemma"), MAX_NEW_TOKENS, len(rows), progress=False
    )
    seconds = time.perf_counter() - start
    tokens = sum(a["n_tokens"] for a in answers)
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": tokens / seconds}


def merge_check(lm, rows: list[dict]) -> dict:
    """Notebook 06's comparison at its default TOLERANCE: the merged copy's logits against the
    LoRA model's."""
    inputs = export.probe_inputs(lm.preprocessor.tokenizer, rows[:2], "gemma", SEQUENCE_LENGTH)
    reference = export.logits(lm, export.hidden_states(lm, inputs))
    merged = export.merged_copy(lm)
    return export.compare(
        reference, export.logits(merged, export.hidden_states(merged, inputs)), TOLERANCE
    )


def memory_in_use_gb() -> float | None:
    """Bytes the first device holds now, in GB (None where JAX does not report it: the CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return round(stats["bytes_in_use"] / 1e9, 2) if "bytes_in_use" in stats else None


def check(model: str, rows: list[dict], precision: str = "auto") -> dict:
    """Every measurement, as one JSON-ready dict."""
    platform, kind, capability = devices.device_facts()
    chosen, reason = devices.precision_policy(precision, platform, capability)
    fp32 = one_update(model, "float32", rows)
    result = {
        "device": {"platform": platform, "kind": kind, "compute_capability": capability},
        "count": len(jax.devices()),
        "policy": chosen,
        "policy_reason": reason,
        "update_fp32": {k: fp32[k] for k in ("loss", "seconds")},
        "merge_check": merge_check(fp32["lm"], rows),
    }
    policy_run = one_update(model, chosen, rows) if chosen != "float32" else fp32
    result["update_policy"] = {k: policy_run[k] for k in ("loss", "seconds")}
    result["loss_difference"] = abs(policy_run["loss"] - fp32["loss"])
    result["decoding"] = decode(policy_run["lm"], rows)
    result["memory_in_use_gb"] = memory_in_use_gb()
    keras.mixed_precision.set_global_policy("float32")
    return result


def table(result: dict) -> str:
    """The Markdown table."""
    device = result["device"]
    cc = (
        f", compute capability {device['compute_capability']}"
        if device["compute_capability"]
        else ""
    )
    merge = result["merge_check"]
    gb = result["memory_in_use_gb"]
    memory = "not reported by JAX" if gb is None else f"{gb} GB"
    lines = [
        f"| device | {result['count']} x {device['kind']} ({device['platform']}{cc}) |",
        "|---|---|",
        f"| policy | {result['policy']} ({result['policy_reason']}) |",
        f"| one update, float32 | loss {result['update_fp32']['loss']:.4f}, "
        f"{result['update_fp32']['seconds']} s |",
        f"| one update, {result['policy']} | loss {result['update_policy']['loss']:.4f}, "
        f"{result['update_policy']['seconds']} s (difference {result['loss_difference']:.2g}) |",
        f"| batched greedy decoding | {result['decoding']['tokens']} tokens, "
        f"{result['decoding']['tokens_per_s']:.1f} tokens/s (compilation included) |",
        f"| merge check (highest precision) | max abs diff {merge['max_abs_diff']:.3g} "
        f"(tolerance {merge['tolerance']:g}): {'passed' if merge['passed'] else 'FAILED'} |",
        f"| device memory in use | {memory} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the check, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3_270m_local")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--precision", default="auto", help="MIXED_PRECISION: auto, bf16, fp32")
    parser.add_argument("--out", default=str(paths.RUNS_DIR / "bench" / "accelerator_check.json"))
    args = parser.parse_args(argv)
    train, _ = prepare_rows(args.rows, 0)
    result = check(args.model, train, args.precision)
    print(table(result))
    files.write_json(Path(args.out), {"model": args.model, "rows": len(train), **result})
    return 0 if result["merge_check"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

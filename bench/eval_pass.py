"""Notebooks 02/04's evaluation: answers, then a second teacher-forced pass for the reference
losses (the code before 2026-12-07 afternoon), against one pass (the prefill scores each reference).

    .venv/bin/python bench/eval_pass.py [--rows 200] [--pairs 2] [--out FILE]

Each arm runs in its own subprocess, alternating (two passes, one pass, two passes, …), on the
real embedded Gemma 3 270M and the first ``rows`` test rows of the built-in task as the ``cpu``
profile prepares them; the time counts compilation, as in ``make run``, and not the model load.
Checks that both arms give the same answers and losses within 1e-4 nats per token. Prints a
Markdown table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

import nbutils  # noqa: F401  (JAX backend before Keras loads)
from nbutils import batches, config, evaluation, files, models, objective, paths, sequences

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import MODEL, SEQUENCE_LENGTH, prepare_rows  # noqa: E402

CPU = config.PROFILES["cpu"].values
SETTINGS = (CPU["MAX_NEW_TOKENS"], CPU["GEN_BATCH_SIZE"], "greedy", 0, 0)


def second_pass_losses(lm, rows: list[dict]) -> list[dict]:
    """Each reference's summed loss and token count from a plain teacher-forced forward pass over
    prompt + reference (length-bucketed batches of 16)."""
    backbone = lm.backbone
    nll_of = jax.jit(
        lambda t, n, inputs: objective.scored_nll(backbone, t, n, inputs, gradient=False)
    )
    trainable, non_trainable = objective.variable_values(backbone)
    arrays = sequences.make_arrays(lm.preprocessor.tokenizer, rows, "gemma", SEQUENCE_LENGTH)
    out = {}
    for b in batches.eval_batches(arrays, 16):
        nll = np.asarray(nll_of(trainable, non_trainable, b.inputs()), np.float64) * b.weights
        for k, i in enumerate(b.rows):
            if i >= 0:
                out[int(i)] = {
                    "loss_sum": float(nll[k].sum()),
                    "loss_tokens": int(b.weights[k].sum()),
                }
    return [out[i] for i in range(len(rows))]


def run_arm(arm: str, n_rows: int) -> dict:
    """One arm's seconds, answers and losses (in this process)."""
    rows = prepare_rows(0, n_rows)[1]
    lm = models.load_gemma(MODEL, sequence_length=SEQUENCE_LENGTH)
    start = time.perf_counter()
    if arm == "one pass":
        answers, losses = evaluation.answer_rows(
            lm, rows, "gemma", *SETTINGS, SEQUENCE_LENGTH, progress=False
        )
    else:
        answers, _ = evaluation.answer_rows(lm, rows, "gemma", *SETTINGS, progress=False)
        losses = second_pass_losses(lm, rows)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "answers": [a["prediction"] for a in answers],
        "nll_per_token": [r["loss_sum"] / r["loss_tokens"] for r in losses],
    }


def main() -> None:
    """Alternate the arms in subprocesses; print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=paths.RUNS_DIR / "bench" / "eval_pass.json")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.rows)))
        return
    runs: dict[str, list[dict]] = {"two passes": [], "one pass": []}
    for _ in range(args.pairs):
        for arm in runs:
            command = [sys.executable, __file__, "--arm", arm, "--rows", str(args.rows)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[arm].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{arm}: {runs[arm][-1]['seconds']:.1f} s", file=sys.stderr)
    first = [r[0] for r in runs.values()]
    same_answers = first[0]["answers"] == first[1]["answers"]
    gap = max(abs(a - b) for a, b in zip(*(r["nll_per_token"] for r in first)))
    summary = {arm: {"seconds": [round(r["seconds"], 1) for r in rs]} for arm, rs in runs.items()}
    summary["check"] = {"same_answers": same_answers, "max_loss_gap_per_token": gap}
    files.write_json(args.out, {"rows": args.rows, **summary})
    print(f"| arm ({args.rows} test rows) | seconds, median [range] |\n|---|---:|")
    for arm, rs in runs.items():
        s = [r["seconds"] for r in rs]
        print(f"| {arm} | {statistics.median(s):.1f} [{min(s):.1f}, {max(s):.1f}] |")
    print(f"same answers: {same_answers}; largest loss gap {gap:.1e} nats/token")
    if not same_answers or gap > 1e-4:
        sys.exit("the arms disagree")


if __name__ == "__main__":
    main()

"""The variants table of docs/results.md from a finished notebook-05 run (``--profile variants-cpu``).

    .venv/bin/python bench/variants_table.py RUN_ID [--reference NAME]

One row per configuration: validation ROUGE-L with its paired-bootstrap 95% CI against the reference
configuration (plain LoRA: the first of the sweep), validation loss (best evaluation), trainable
parameters and training seconds; modules resampled whole, as notebook 05 does.
"""

from __future__ import annotations

import argparse
import csv

import nbutils  # noqa: F401  (JAX backend before Keras loads)
from nbutils import config, data, evaluation, files, paths, report

N_BOOTSTRAP = 1000


def rows(run_id: str, reference: str | None) -> list[dict]:
    """The table's rows."""
    out = paths.RUNS_DIR / run_id
    with open(out / "sweep_results.csv", newline="") as f:
        results = list(csv.DictReader(f))
    reference = reference or results[0]["name"]
    scores = {
        r["name"]: files.read_jsonl(out / "sweep" / r["name"] / "val_scores.jsonl") for r in results
    }
    params = files.read_json(out / "config.json")["parameters"]
    val = data.load_processed(params.get("DATASET", config.default("DATASET")))[0]["val"]
    groups = data.bootstrap_groups(val[: len(scores[reference])])
    table = []
    for r in results:
        ci = evaluation.paired_bootstrap(
            scores[reference], scores[r["name"]], N_BOOTSTRAP, 0, groups
        )["rougeL_f1"]
        table.append(
            {
                "configuration": r["name"],
                "val ROUGE-L": float(r["val_rougeL_f1"]),
                "diff vs plain": ci["diff"],
                "95% CI": ci["ci95"],
                "val loss": float(r["best_val_loss"]),
                "trainable": int(r["trainable_params"]),
                "training s": float(r["train_seconds"]),
            }
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id")
    parser.add_argument("--reference", default=None, help="the configuration compared against")
    args = parser.parse_args()
    table = rows(args.run_id, args.reference)
    print(report.table(table, tuple(table[0])))


if __name__ == "__main__":
    main()

"""Where the training process's memory goes: resident and peak RSS after each stage of a `cpu` run.

    .venv/bin/python bench/memory_profile.py [--rows 64] [--max-batch-tokens N] [--out FILE]

One process does what notebook 03 does with the embedded Gemma 3 270M (LoRA rank 8 on all
projections, batch 4, the fast path on length-bucketed batches in steps of at most
``--max-batch-tokens`` tokens, by default the ``cpu`` profile's MAX_BATCH_TOKENS) and prints, after
each stage, the current and peak resident memory (Linux ``/proc/self/status``), the XLA scratch
("temp") buffer each compiled step shape allocates while it runs, and what glibc hands back to the
system after ``malloc_trim``. Writes the figures as JSON (default
``runs/bench/memory_profile.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nbutils  # noqa: F401  (JAX backend before Keras loads)
from nbutils import config, files, paths

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import MODEL, RANK, SEED, SEQUENCE_LENGTH, optimizer, prepare_rows


def rss_gb() -> tuple[float, float]:
    """Current and peak resident memory of this process (GB)."""
    status = dict(
        line.split(":", 1)
        for line in Path("/proc/self/status").read_text().splitlines()
        if ":" in line
    )
    return int(status["VmRSS"].split()[0]) / 1e6, int(status["VmHWM"].split()[0]) / 1e6


def main() -> int:
    """Run the stages, print one line per stage, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows", type=int, default=64, help="training rows (batches of 4, one pass)"
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=config.PROFILES["cpu"].values["MAX_BATCH_TOKENS"],
        help="tokens per step (MAX_BATCH_TOKENS); default: the cpu profile's",
    )
    parser.add_argument("--out", default=str(paths.RUNS_DIR / "bench" / "memory_profile.json"))
    args = parser.parse_args()
    if not Path("/proc/self/status").exists():
        raise SystemExit("bench/memory_profile.py reads /proc/self/status: run it on Linux.")
    stages: list[dict] = []

    def record(stage: str, **extra) -> None:
        now, peak = rss_gb()
        stages.append(
            {"stage": stage, "rss_gb": round(now, 2), "peak_rss_gb": round(peak, 2), **extra}
        )
        print(
            f"{stage:42s} rss {now:5.2f} GB   peak {peak:5.2f} GB   {json.dumps(extra) if extra else ''}",
            flush=True,
        )

    record("python + nbutils")
    from nbutils import quiet

    quiet.load_frameworks()
    record("JAX, Keras, keras-hub (+TensorFlow)", tensorflow_loaded="tensorflow" in sys.modules)

    from nbutils import batches, devices, heap, models, sequences, training

    rows, _ = prepare_rows(args.rows, 1)
    record("tokenizer + training rows")
    lm = models.load_gemma(MODEL, sequence_length=SEQUENCE_LENGTH)
    record("model loaded (fp32 weights)")
    training.enable_lora(lm, RANK, "all", seed=SEED)
    trainer = training.Trainer(lm, optimizer(len(rows) // 4), args.max_batch_tokens)
    state = trainer.state()
    arrays = sequences.make_arrays(lm.preprocessor.tokenizer, rows, "gemma", SEQUENCE_LENGTH)
    record("LoRA enabled, optimizer built")
    for batch in batches.epoch_batches(arrays, 4, SEED, 0):
        new = [
            piece
            for piece in trainer.steps([batch])
            if ("train", piece.shape) not in trainer.compiled
        ]
        # each new step shape's XLA scratch buffer (the jitted value-and-grad of Trainer)
        temps = {}
        for piece in new:
            compiled = trainer.grad_step.lower(
                state[0], state[1], devices.place_batch(piece.inputs()), 1.0
            ).compile()
            temps[str(piece.shape)] = round(compiled.memory_analysis().temp_size_in_bytes / 1e9, 2)
        _, state = trainer.update([batch], state)
        if new:
            record(f"first update of batch {batch.shape}", xla_temp_gb=temps)
    record("one pass trained")
    trimmed = heap.release_free_heap()
    record("after malloc_trim (freed heap returned)", trimmed=bool(trimmed))
    peak = max(s["peak_rss_gb"] for s in stages)
    files.write_json(
        Path(args.out),
        {
            "rows": args.rows,
            "max_batch_tokens": args.max_batch_tokens,
            "stages": stages,
            "peak_rss_gb": peak,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training throughput: keras-hub's stock LoRA recipe vs the project's fast path, and batched
generation.

    .venv/bin/python bench/train_throughput.py [--updates 16] [--batch-size 4] [--pairs 2] [--out
    FILE]

Both arms train the real embedded Gemma 3 270M (LoRA rank 8 on all projections, AdamW 5e-4, seed 0)
on the same rows of the built-in task for the same number of updates, each in its own subprocess
(stock, project, stock, project, … so neither gets a warmer machine): (a) stock: ``Gemma3CausalLM``
with its own preprocessor, ``fit`` on ``{"prompts", "responses"}`` at a fixed ``sequence_length``
(the recipe of Google's Keras LoRA tutorial); (b) project: ``nbutils.training.Trainer`` on
length-bucketed batches, logits at response positions, each batch run in steps of at most the
``cpu`` profile's MAX_BATCH_TOKENS tokens (once more with whole batches, MAX_BATCH_TOKENS 0, and
once on the stock arm's batches, to compare). Throughput counts response tokens per second of
steady-state steps (steps that compiled a new shape are timed apart as compile time). Both final
adapters are scored by the same response loss on the training rows. The script also measures the
machine's fp32 matmul peak with JAX, counts the fast path's FLOPs from the model's shapes, and times
batched greedy generation against one-by-one ``generate`` on 64 test prompts (checking the answers
match). Prints a Markdown table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import nbutils  # noqa: F401  (JAX backend before Keras loads)
from nbutils import config, files, objective, paths

if TYPE_CHECKING:
    import keras_hub

MODEL, SEQUENCE_LENGTH, RANK, LR, SEED = "gemma3_270m_local", 160, 8, 5e-4, 0
# the project arm steps as the cpu profile does
MAX_BATCH_TOKENS = config.PROFILES["cpu"].values["MAX_BATCH_TOKENS"]


def prepare_rows(n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """Train and test rows of the built-in task, as the ``cpu`` profile prepares them."""
    from nbutils import data, models, prompts

    tok = models.load_tokenizer(MODEL)
    rows, _ = data.load_source(data.BUILTIN, tokenizer=tok, max_source_tokens=112)
    kept, _ = data.validate(rows, tok, prompts.Template("gemma"), SEQUENCE_LENGTH)
    splits, _ = data.split(kept, 0.1, 0.1, SEED)
    return splits["train"][:n_train], splits["test"][:n_test]


def sustained_gflops(f, args: tuple, flops: float, seconds: float) -> float:
    """GFLOP/s of the jitted ``f(*args)`` (``flops`` per call) over ``seconds`` of back-to-back
    calls, after a first call."""
    f(*args).block_until_ready()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        f(*args).block_until_ready()
        count += 1
    return flops * count / (time.perf_counter() - start) / 1e9


def matmul_peak_gflops(n: int = 2048, seconds: float = 3.0) -> float:
    """Sustained fp32 GFLOP/s of a large square matmul under JAX on this machine."""
    import jax
    import jax.numpy as jnp

    return sustained_gflops(
        jax.jit(lambda x: x @ x), (jnp.ones((n, n), jnp.float32),), 2 * n**3, seconds
    )


def head_entries(piece) -> int:
    """The entries the fast path's output layer runs on in one step (see
    ``objective.output_nll``)."""
    rows, _, scored = piece.shape
    return objective.head_size(rows * scored, piece.useful_tokens)


def step_flops(backbone, rows: int, width: int, head_positions: int, merged_lora: bool) -> float:
    """FLOPs of one LoRA training step from the model's shapes (forward + backward to the adapters).

    Frozen projections: 2·params per token forward and 2·params backward (input gradients); with
    Keras' merged LoRA kernel, another 2·params for the kernel gradient. Attention scores and
    values: 4·T²·(heads·head_dim) per layer forward, twice that backward. LM head (tied embedding)
    at the ``head_positions`` it runs on (the whole step): 2·V·d forward and 2·V·d backward.
    """
    kernels = sum(int(np.prod(v.shape)) for v in backbone.weights if v.path.endswith("/kernel"))
    tokens = rows * width
    linear = (6 if merged_lora else 4) * kernels * tokens
    attn = (
        3 * 4 * rows * width**2 * backbone.num_query_heads * backbone.head_dim * backbone.num_layers
    )
    head = 4 * backbone.vocabulary_size * backbone.hidden_dim * head_positions
    return float(linear + attn + head)


def peak_rss_gb() -> float:
    """This process's peak resident memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def mean_response_loss(lm, rows: list[dict]) -> float:
    """Loss per response token on ``rows`` (the common yardstick of both arms)."""
    from nbutils import evaluation

    # one new token: only the reference losses are looked at
    settings = (1, 16, "greedy", 0, 0, SEQUENCE_LENGTH)
    losses = evaluation.answer_rows(lm, rows, "gemma", *settings, progress=False)[1]
    return sum(r["loss_sum"] for r in losses) / sum(r["loss_tokens"] for r in losses)


def run_stock(rows: list[dict], batch_size: int) -> dict:
    """keras-hub's own recipe: its preprocessor builds padded batches, ``fit`` trains on full
    logits."""
    import keras

    from nbutils import compat, models, prompts, sequences, training

    # before the tokenizer exists: after, it breaks its TF resource
    keras.utils.set_random_seed(SEED)
    lm = models.load_gemma(MODEL, sequence_length=SEQUENCE_LENGTH)
    lm.backbone.enable_lora(RANK, target_layer_names=training.lora_layer_names("all"))
    # The same seeded A matrices as the project arm (keras-hub's own merged LoRA compute is kept).
    training.seed_lora_a(
        [lyr for lyr in compat.all_layers(lm.backbone) if getattr(lyr, "lora_enabled", False)], SEED
    )
    lm.compile(
        optimizer=optimizer(len(rows) // batch_size),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    useful = [
        sum(
            len(t)
            for _, t in sequences.encode(
                lm.preprocessor.tokenizer, rows[i : i + batch_size], "gemma"
            )
        )
        for i in range(0, len(rows), batch_size)
    ]

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            seconds.append(time.perf_counter() - self.t0)
            losses.append(float(logs["loss"]))

    seconds, losses = [], []
    x = {
        "prompts": [prompts.render_prompt(r, "gemma") for r in rows],
        "responses": [r["output"] for r in rows],
    }
    lm.fit(x=x, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[Timer()])
    training_peak = peak_rss_gb()  # before the yardstick loss below, which is not part of training
    steady = seconds[1:]  # the first step compiles
    backbone = lm.backbone
    return {
        "useful_tokens_per_s": sum(useful[1:]) / sum(steady),
        "seconds_per_update": float(np.mean(steady)),
        "compile_s": seconds[0] - float(np.mean(steady)),
        "wall_s": sum(seconds),
        "compilations": 1,
        "gflop_per_update": step_flops(
            backbone, batch_size, SEQUENCE_LENGTH, batch_size * (SEQUENCE_LENGTH - 1), True
        )
        / 1e9,
        "final_loss": mean_response_loss(lm, rows),
        "peak_rss_gb": training_peak,
        "peak_rss_with_eval_gb": peak_rss_gb(),
    }


def optimizer(updates: int):
    """The project's AdamW (``training.adamw``) at the bench's learning rate, no warmup or clipping,
    for both arms."""
    from nbutils import training

    cfg = training.TrainConfig(learning_rate=LR, warmup_steps=0, clipnorm=0.0)
    return training.adamw(cfg, updates)


def project_trainer(rows: list[dict], max_batch_tokens: int = MAX_BATCH_TOKENS) -> tuple:
    """The fast path's model, ``Trainer`` and token arrays for ``rows`` (LoRA rank 8 on all
    projections, AdamW)."""

    from nbutils import models, sequences, training

    lm = models.load_gemma(MODEL, sequence_length=SEQUENCE_LENGTH)
    training.enable_lora(lm, RANK, "all", seed=SEED)
    trainer = training.Trainer(lm, optimizer(len(rows) // 4), max_batch_tokens)
    return (
        lm,
        trainer,
        sequences.make_arrays(lm.preprocessor.tokenizer, rows, "gemma", SEQUENCE_LENGTH),
    )


def run_project(
    rows: list[dict],
    batch_size: int,
    same_batches: bool = False,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
) -> dict:
    """The fast path: bucketed batches, logits at response positions, one jitted stateless step.

    ``same_batches``: the stock arm's batches (rows in file order), each only as wide as its longest
    row, so the two loss trajectories can be compared update for update.
    """
    from nbutils import batches

    lm, trainer, arrays = project_trainer(rows, max_batch_tokens)
    state, steady, compiles, flops = trainer.state(), [], [], []
    order = [np.arange(i, i + batch_size) for i in range(0, len(rows) - batch_size + 1, batch_size)]
    scored = batches.scored_entries(arrays)
    plan = (
        [batches.make_batch(arrays, idx, scored=scored) for idx in order]
        if same_batches
        else batches.epoch_batches(arrays, batch_size, SEED, 0)
    )
    for b in plan:
        new_shape = trainer.will_compile([b])
        start = time.perf_counter()
        _, state = trainer.update([b], state)
        seconds = time.perf_counter() - start
        (compiles if new_shape else steady).append((seconds, b.useful_tokens))
        if not new_shape:
            flops.append(
                sum(
                    step_flops(
                        lm.backbone, *piece.shape[:2], head_entries(piece), merged_lora=False
                    )
                    for piece in trainer.steps([b])
                )
            )
    trainer.write_back(state)
    training_peak = peak_rss_gb()  # before the yardstick loss below, which is not part of training
    steady_s = sum(s for s, _ in steady)
    mean_steady = steady_s / len(steady)
    return {
        "useful_tokens_per_s": sum(u for _, u in steady) / steady_s,
        "seconds_per_update": mean_steady,
        "compile_s": sum(s - mean_steady for s, _ in compiles),
        "wall_s": steady_s + sum(s for s, _ in compiles),
        "compilations": len(trainer.compiled),
        "gflop_per_update": float(np.mean(flops)) / 1e9,
        "gflops": sum(flops) / steady_s / 1e9,
        "final_loss": mean_response_loss(lm, rows),
        "peak_rss_gb": training_peak,
        "peak_rss_with_eval_gb": peak_rss_gb(),
    }


def budget_sampler(max_new_tokens: int) -> keras_hub.samplers.GreedySampler:
    """The project's greedy sampler, its rows each ending after ``max_new_tokens`` new tokens in
    ``lm.generate``.

    keras-hub's loop runs until every row has produced a stop token (or the length is used up); here
    a row past its budget gets logits that make it emit the stop token; tokens within the budget are
    unchanged. Relies on keras-hub's loop calling ``next(prompt, cache, index)`` for the token at
    ``index`` with ``mask`` the left-aligned prompt mask (``tests/test_bench.py`` checks it). The
    forced stop is one decode step more than ``evaluation.generate`` runs for an answer that never
    stops.
    """
    from keras import ops

    from nbutils import evaluation

    class RowBudget(evaluation.greedy_sampler_class()):
        def __call__(
            self, next, prompt, cache=None, index=0, mask=None, stop_token_ids=None, **kwargs
        ):
            """keras-hub's sampling loop, with ``next`` wrapped so that rows past their budget
            stop."""
            if mask is None or not stop_token_ids:
                raise ValueError(
                    "budget_sampler needs the prompt mask and stop_token_ids (as lm.generate passes them)"
                )
            # prompts are left-aligned
            limit = ops.sum(ops.cast(mask, "int32"), axis=-1) + max_new_tokens

            def capped(prompt, cache, index):
                logits, hidden_states, cache = next(prompt, cache, index)
                stop_only = ops.where(
                    ops.arange(ops.shape(logits)[-1]) == stop_token_ids[0], 0.0, -1e4
                )
                done = ops.expand_dims(index >= limit, -1)
                return (
                    ops.where(done, ops.cast(stop_only, logits.dtype), logits),
                    hidden_states,
                    cache,
                )

            return super().__call__(capped, prompt, cache, index, mask, stop_token_ids, **kwargs)

    return RowBudget()


def run_generation(rows: list[dict], max_new_tokens: int = 40, batch_size: int = 16) -> dict:
    """Batched greedy generation (``evaluation.generate``) vs one stock ``lm.generate`` call per
    prompt.

    The one-by-one arm gives each prompt room for ``max_new_tokens`` in a length rounded up to a
    multiple of 32 (so it compiles a few shapes, not one per prompt) and ends each answer after
    ``max_new_tokens`` (:func:`budget_sampler`), as ``evaluation.generate`` does; answers are
    compared on their first ``max_new_tokens`` tokens. Both arms' times include their compilations.
    """
    from nbutils import batches, evaluation, models, prompts, sequences

    lm = models.load_gemma(MODEL, sequence_length=SEQUENCE_LENGTH)
    tok = lm.preprocessor.tokenizer
    start = time.perf_counter()
    batched = evaluation.generate(lm, rows, "gemma", max_new_tokens, batch_size, progress=False)
    batched_s = time.perf_counter() - start
    lm.compile(sampler=budget_sampler(max_new_tokens))
    stop = sequences.stop_token_id(tok, "gemma")
    start, single = time.perf_counter(), []
    for r, ids in zip(rows, sequences.prompt_ids(tok, rows, "gemma")):
        prompt = prompts.render_prompt(r, "gemma")
        length = batches.round_up(len(ids) + max_new_tokens, 32)
        single.append(
            lm.generate(prompt, max_length=length, stop_token_ids=[stop]).removeprefix(prompt)
        )
    single_s = time.perf_counter() - start
    cap = lambda text: (
        tok.detokenize(sequences.tokenize_batch(tok, [text])[0][:max_new_tokens]) if text else ""
    )
    same = sum(cap(s) == cap(b["prediction"]) for s, b in zip(single, batched))
    return {
        "rows": len(rows),
        "batched_s": batched_s,
        "one_by_one_s": single_s,
        "batched_speedup": single_s / batched_s,
        "identical_answers": int(same),
    }


def child(arm: str, rows_path: str, batch_size: int) -> None:
    """Run one arm in this process and print its result as JSON on the last line."""
    rows = files.read_jsonl(Path(rows_path))
    arms = {
        "stock": run_stock,
        "project": run_project,
        "project_same_batches": lambda r, b: run_project(r, b, True),
        "project_whole_batches": lambda r, b: run_project(r, b, max_batch_tokens=0),
    }
    result = arms[arm](rows, batch_size) if arm != "generation" else run_generation(rows)
    print(json.dumps(result))


def spawn(arm: str, rows_path: Path, batch_size: int) -> dict:
    """One arm in a fresh subprocess (its own memory peak and compile cache)."""
    cmd = [
        sys.executable,
        __file__,
        "--arm",
        arm,
        "--rows",
        str(rows_path),
        "--batch-size",
        str(batch_size),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    )
    if proc.returncode:
        raise SystemExit(f"{arm} arm failed:\n{proc.stderr[-3000:]}")
    print(f"  {arm} done", flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(result: dict) -> str:
    """The README's Markdown table."""
    s, p, q, w = (
        result["stock"],
        result["project"],
        result["project_same_batches"],
        result["project_whole_batches"],
    )
    rows = [
        ("response tokens/s (steady state)", "useful_tokens_per_s", "{:.1f}"),
        ("seconds per update", "seconds_per_update", "{:.2f}"),
        ("GFLOP per update", "gflop_per_update", "{:.0f}"),
        ("compiled shapes", "compilations", "{:d}"),
        ("compile time (s)", "compile_s", "{:.0f}"),
        ("final loss on the training rows", "final_loss", "{:.4f}"),
        ("peak RSS while training (GB)", "peak_rss_gb", "{:.2f}"),
        ("peak RSS incl. the final-loss evaluation (GB)", "peak_rss_with_eval_gb", "{:.2f}"),
    ]
    lines = [
        f"| | stock keras-hub `fit` | fast path, bucketed (the project's, MAX_BATCH_TOKENS {MAX_BATCH_TOKENS}) | "
        "fast path, the stock's batches | fast path, whole batches (MAX_BATCH_TOKENS 0) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {label} | {fmt.format(s[k])} | {fmt.format(p[k])} | {fmt.format(q[k])} | {fmt.format(w[k])} |"
        for label, k, fmt in rows
    ]
    g = result["generation"]
    return "\n".join(
        lines
        + [
            "",
            f"ratio (response tokens/s, project / stock): **{result['ratio']:.2f}×** "
            f"(per pair: {', '.join(f'{r:.2f}' for r in result['ratios_per_pair'])}); final loss on the "
            f"stock's batches within **{result['loss_gap_same_batches']:.1%}** of stock; "
            f"fast path at {p['gflops']:.0f} GFLOP/s = **{p['peak_share']:.0%}** of the measured fp32 "
            f"matmul peak ({result['matmul_peak_gflops']:.0f} GFLOP/s); batched generation "
            f"**{g['batched_speedup']:.1f}×** faster than one-by-one ({g['identical_answers']}/{g['rows']} "
            "answers identical).",
        ]
    )


def main() -> int:
    """Run the arms, alternating, and write the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=2, help="stock/project pairs, alternating")
    parser.add_argument("--out", default=str(paths.RUNS_DIR / "bench" / "train_throughput.json"))
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        child(args.arm, args.rows, args.batch_size)
        return 0
    train_rows, test_rows = prepare_rows(args.updates * args.batch_size, 64)
    with tempfile.TemporaryDirectory() as tmp:
        train_path, test_path = Path(tmp) / "train.jsonl", Path(tmp) / "test.jsonl"
        files.write_jsonl(train_path, train_rows)
        files.write_jsonl(test_path, test_rows)
        peak = matmul_peak_gflops()
        print(
            f"matmul peak {peak:.0f} GFLOP/s; {args.pairs} pairs of {args.updates} updates x {args.batch_size} rows",
            flush=True,
        )
        runs = {"stock": [], "project": []}
        for _ in range(args.pairs):
            for arm in runs:
                runs[arm].append(spawn(arm, train_path, args.batch_size))
        same = spawn("project_same_batches", train_path, args.batch_size)
        whole = spawn("project_whole_batches", train_path, args.batch_size)
        generation = spawn("generation", test_path, args.batch_size)
    best = {arm: max(rs, key=lambda r: r["useful_tokens_per_s"]) for arm, rs in runs.items()}
    result = {
        **best,
        "project_same_batches": same,
        "project_whole_batches": whole,
        "runs": runs,
        "generation": generation,
        "matmul_peak_gflops": peak,
        "ratio": best["project"]["useful_tokens_per_s"] / best["stock"]["useful_tokens_per_s"],
        "ratios_per_pair": [
            p["useful_tokens_per_s"] / s["useful_tokens_per_s"]
            for s, p in zip(runs["stock"], runs["project"])
        ],
        "loss_gap_same_batches": abs(same["final_loss"] / best["stock"]["final_loss"] - 1),
        "peak_rss_gb": best["project"]["peak_rss_gb"],
        "compilations": best["project"]["compilations"],
        "settings": {
            "model": MODEL,
            "updates": args.updates,
            "batch_size": args.batch_size,
            "rank": RANK,
            "targets": "all",
            "learning_rate": LR,
            "sequence_length": SEQUENCE_LENGTH,
            "cores": os.cpu_count(),
        },
    }
    result["project"]["peak_share"] = result["project"]["gflops"] / peak
    result["table"] = table(result)
    files.write_json(Path(args.out), result)
    print(result["table"])
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generation, metrics and paired comparison (notebooks 02 and 04).

Generation (:mod:`nbutils.decoding`) decodes token ids we build with the shared template with
keras-hub's samplers, so we know exactly how many tokens each answer used and whether it ended on
the stop token. Metrics come from established packages (``rouge-score``, ``sacrebleu``).
"""

from __future__ import annotations

import functools
import re
import string
import time

import keras_hub
import numpy as np
from keras import ops
from rouge_score import rouge_scorer

from nbutils import compat, decoding, prompts, sequences
from nbutils import progress as progress_bar

METRICS = ("rougeL_f1", "chrf", "exact_match", "response_loss", "stop_rate", "mean_tokens")
HIGHER_IS_BETTER = {
    "rougeL_f1": True,
    "chrf": True,
    "exact_match": True,
    "response_loss": False,
    "stop_rate": True,
    "mean_tokens": None,
}


def make_sampler(spec: str = "greedy", seed: int = 0):
    """A keras-hub sampler from ``greedy``, ``beam:<beams>``, ``top_k:<k>`` or ``top_p:<p>``
    (sampling is seeded)."""

    kind, _, value = spec.partition(":")
    try:
        k, p = (
            int(value or (4 if kind == "beam" else 50)) if kind in ("top_k", "beam") else 1,
            float(value or 0.9) if kind == "top_p" else 0.5,
        )
    except ValueError:
        k = p = None
    if kind == "greedy" and not value:
        cls, kwargs = greedy_sampler_class(), {}
    elif kind == "beam" and k is not None and k >= 2:
        cls, kwargs = keras_hub.samplers.BeamSampler, {"num_beams": k}
    elif kind == "top_k" and k is not None and k >= 1:
        cls, kwargs = keras_hub.samplers.TopKSampler, {"k": k, "seed": seed}
    elif kind == "top_p" and p is not None and 0 < p <= 1:
        cls, kwargs = keras_hub.samplers.TopPSampler, {"p": p, "seed": seed}
    else:
        raise ValueError(
            f"SAMPLER={spec!r}: use 'greedy', 'beam:<beams>' (beams >= 2), 'top_k:<k>' (k >= 1) "
            "or 'top_p:<p>' (0 < p <= 1)."
        )
    return cls(**kwargs)


def keras_hub_generate_sampler(spec: str, seed: int = 0):
    """The sampler for keras-hub's own ``generate``: ``spec``'s, except greedy for beam search
    (keras-hub 0.32's Gemma 3 generate step fails with its ``BeamSampler``: it slices its padding
    mask, one row per prompt, as if it had a row per beam; our batched decoder runs beams)."""
    if spec.startswith("beam"):
        print(
            f"SAMPLER={spec!r}: keras-hub's generate cannot run beam search on Gemma; greedy here"
        )
        spec = "greedy"
    return make_sampler(spec, seed)


def first_argmax(x, block: int = 512):
    """``ops.argmax(x, axis=-1)`` of a 2-D ``x`` (the same index, ties and NaN included), as two
    short reductions.

    XLA's CPU backend runs one argmax over a 262k-word vocabulary as a slow serial reduction; the
    maximum of each block of ``block`` entries, then the argmax inside the first block holding the
    overall maximum, are far faster (measured in docs/design.md).
    """

    rows, vocab = x.shape
    if vocab % block:
        x = ops.pad(x, ((0, 0), (0, block - vocab % block)), constant_values=float("-inf"))
    blocks = ops.reshape(x, (rows, -1, block))
    best = ops.argmax(ops.max(blocks, axis=-1), axis=-1)
    inside = ops.take_along_axis(blocks, ops.reshape(best, (-1, 1, 1)), axis=1)[:, 0]
    return ops.cast(best, "int32") * block + ops.cast(ops.argmax(inside, axis=-1), "int32")


@functools.cache
def greedy_sampler_class() -> type:
    """keras-hub's ``GreedySampler`` picking its token with :func:`first_argmax` (the same tokens,
    faster on a CPU)."""

    class BlockArgmaxGreedySampler(keras_hub.samplers.GreedySampler):
        def get_next_token(self, probabilities):
            """The most probable token of each row."""
            return first_argmax(probabilities)

    return BlockArgmaxGreedySampler


def answer_tokens(new: np.ndarray, stop: int) -> tuple[list[int], bool]:
    """The generated ids of one row up to its stop token (excluded) and whether it produced one."""
    new = np.asarray(new).tolist()
    if stop in new:
        return new[: new.index(stop)], True
    return new, False


def generate(
    lm,
    rows: list[dict],
    template,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    sampler: str = "greedy",
    seed: int = 0,
    progress: bool = True,
    min_new_tokens: int = 0,
) -> list[dict]:
    """Generate an answer for every row; returns id, instruction, prompt (as rendered), reference,
    prediction, stopped, n_tokens.

    Each answer has at most ``max_new_tokens`` tokens, its stop token included, and no stop token
    among its first ``min_new_tokens`` (see :mod:`nbutils.decoding`).
    """
    decoding_settings = (max_new_tokens, batch_size, sampler, seed, min_new_tokens)
    return answer_rows(lm, rows, template, *decoding_settings, progress=progress)[0]


def answer_rows(
    lm,
    rows: list[dict],
    template,
    max_new_tokens: int,
    batch_size: int,
    sampler: str,
    seed: int,
    min_new_tokens: int,
    sequence_length: int | None = None,
    progress: bool = True,
) -> tuple[list[dict], list[dict] | None]:
    """:func:`generate`'s answers and, given ``sequence_length``, each reference's teacher-forced
    loss (summed nats and token count of response + stop token) from the same prefill.

    The loss is training's objective (:func:`nbutils.objective.output_nll`) at the positions before
    each reference token.
    """
    if not rows:
        return [], [] if sequence_length else None
    tokenizer = lm.preprocessor.tokenizer
    stop = sequences.stop_token_id(tokenizer, template)
    texts = [prompts.render_prompt(r, template) for r in rows]
    if sequence_length:
        pairs = sequences.encode(tokenizer, rows, template)
        sequences.check_fit(rows, pairs, sequence_length)
        prompt_ids, target_ids = [p for p, _ in pairs], [t for _, t in pairs]
    else:  # answers only: the references are not tokenized
        prompt_ids, target_ids = sequences.prompt_ids(tokenizer, rows, template), None
    batch_size = min(batch_size, len(rows))  # no empty rows decoded alongside a short list
    decode = decoding.make_decoder(
        lm,
        make_sampler(sampler, seed),
        batch_size,
        decoding.prompt_end(prompt_ids),
        max_new_tokens,
        [stop],
        min_new_tokens,
        max(len(t) for t in target_ids) if target_ids else 0,
    )
    # similar lengths: fewer prefill chunks
    order = sorted(range(len(rows)), key=lambda i: len(prompt_ids[i]))
    results, losses = {}, {}
    bar = progress_bar.bar(len(rows), "generating", "row", enabled=progress)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        targets = [target_ids[i] for i in idx] if target_ids else None
        new, nll = decode([prompt_ids[i] for i in idx], targets)
        for k, i in enumerate(idx):
            ids, stopped = answer_tokens(new[k], stop)
            results[i] = {
                "id": rows[i].get("id", str(i)),
                "instruction": rows[i]["instruction"],
                "prompt": texts[i],
                "reference": rows[i]["output"],
                "prediction": tokenizer.detokenize(ids) if ids else "",
                "stopped": stopped,
                "n_tokens": len(ids),
            }
            if targets:
                row_nll = np.asarray(nll[k, : len(targets[k])], np.float64)
                losses[i] = {"loss_sum": float(row_nll.sum()), "loss_tokens": len(targets[k])}
        bar.update(len(idx))
    bar.close()
    in_order = [results[i] for i in range(len(rows))]
    return in_order, [losses[i] for i in range(len(rows))] if target_ids else None


def normalise(text: str) -> str:
    """Lowercase, drop punctuation and collapse whitespace (for exact match)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def score_rows(predictions: list[dict], losses: list[dict] | None = None) -> list[dict]:
    """Per-row ROUGE-L F1, chrF statistics, exact match, stop flag, token count and loss."""

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scored = []
    for k, p in enumerate(predictions):
        ref, hyp = p["reference"], p["prediction"]
        row = {
            "id": p["id"],
            "rougeL_f1": scorer.score(ref, hyp)["rougeL"].fmeasure,
            "chrf_stats": compat.chrf_statistics(hyp, ref),
            "exact_match": float(normalise(ref) == normalise(hyp)),
            "stopped": float(p["stopped"]),
            "n_tokens": float(p["n_tokens"]),
        }
        if losses:
            row.update(losses[k])
        scored.append(row)
    return scored


def _columns(scored: list[dict]) -> dict[str, np.ndarray]:
    """Per-row scores as arrays (one per key)."""
    return {k: np.array([r[k] for r in scored], dtype=float) for k in scored[0] if k != "id"}


def aggregate(scored: list[dict] | dict, idx: np.ndarray | None = None) -> dict:
    """Test-set metrics from per-row scores (optionally on a resampled index).

    ROUGE-L, exact match, stop rate and answer length are means over rows; chrF is sacrebleu's
    *corpus* chrF (character n-gram statistics summed over the rows, then one F-score); the response
    loss is the mean over all reference tokens.
    """
    cols = scored if isinstance(scored, dict) else _columns(scored)
    idx = np.arange(len(cols["rougeL_f1"])) if idx is None else idx
    out = {
        "rougeL_f1": cols["rougeL_f1"][idx].mean(),
        "chrf": compat.chrf_from_statistics(cols["chrf_stats"][idx].sum(0)) / 100,
        "exact_match": cols["exact_match"][idx].mean(),
        "stop_rate": cols["stopped"][idx].mean(),
        "mean_tokens": cols["n_tokens"][idx].mean(),
    }
    if "loss_sum" in cols:
        out["response_loss"] = cols["loss_sum"][idx].sum() / max(cols["loss_tokens"][idx].sum(), 1)
        out["perplexity"] = float(np.exp(out["response_loss"]))
    return {k: float(v) for k, v in out.items()}


def _resample_rows(n: int, rng) -> np.ndarray:
    """A bootstrap sample of row indices."""
    return rng.integers(0, n, n)


def _resample_clusters(members: list[np.ndarray], rng) -> np.ndarray:
    """A cluster-bootstrap sample: whole groups drawn with replacement, all their rows kept."""
    return np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])


def paired_bootstrap(
    base: list[dict],
    tuned: list[dict],
    n_resamples: int = 1000,
    seed: int = 0,
    groups: list[str] | None = None,
) -> dict:
    """Tuned − baseline per metric, with paired bootstrap 95% CIs.

    ``ci95_rows`` resamples test rows as if independent. With ``groups`` (e.g. each row's module),
    rows of one group are correlated, so ``ci95_clusters`` resamples whole groups; ``ci95`` is the
    cluster interval when groups are given, else the row interval.
    """
    if [r["id"] for r in base] != [r["id"] for r in tuned]:
        raise ValueError(
            "baseline and tuned predictions are not on the same test rows in the same order; rerun 02."
        )
    cols_b, cols_t = _columns(base), _columns(tuned)
    point_b, point_t = aggregate(cols_b), aggregate(cols_t)
    keys = [k for k in point_b if k in point_t]
    samplers = {"rows": lambda rng: _resample_rows(len(base), rng)}
    if groups is not None:
        if len(groups) != len(base):
            raise ValueError(f"groups has {len(groups)} entries for {len(base)} test rows.")
        names = sorted(set(groups))
        members = [np.flatnonzero(np.asarray(groups) == g) for g in names]
        samplers["clusters"] = lambda rng: _resample_clusters(members, rng)
    out = {
        k: {"baseline": point_b[k], "tuned": point_t[k], "diff": point_t[k] - point_b[k]}
        for k in keys
    }
    for method, draw in samplers.items():
        rng = np.random.default_rng(seed)
        diffs = {k: [] for k in keys}
        for _ in range(n_resamples):
            idx = draw(rng)
            b, t = aggregate(cols_b, idx), aggregate(cols_t, idx)
            for k in keys:
                diffs[k].append(t[k] - b[k])
        for k in keys:
            out[k][f"ci95_{method}"] = [
                float(np.percentile(diffs[k], 2.5)),
                float(np.percentile(diffs[k], 97.5)),
            ]
    for k in keys:
        out[k]["ci95"] = out[k]["ci95_clusters" if groups is not None else "ci95_rows"]
        out[k]["ci_method"] = (
            f"cluster bootstrap over {len(set(groups))} groups"
            if groups is not None
            else "row bootstrap"
        )
    return out


def run_inference(
    lm,
    rows: list[dict],
    template,
    sequence_length: int,
    max_new_tokens: int,
    batch_size: int,
    sampler: str,
    seed: int,
    min_new_tokens: int = 0,
) -> tuple[list[dict], list[dict], dict]:
    """Answers, teacher-forced reference losses (one pass, :func:`answer_rows`) and per-row
    scores; returns predictions, scores and the time taken."""
    t0 = time.perf_counter()
    decoding_settings = (max_new_tokens, batch_size, sampler, seed, min_new_tokens)
    predictions, losses = answer_rows(lm, rows, template, *decoding_settings, sequence_length)
    return (
        predictions,
        score_rows(predictions, losses),
        {"generate_s": round(time.perf_counter() - t0, 1)},
    )

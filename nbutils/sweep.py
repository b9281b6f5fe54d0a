"""Notebook 05's sweep: LoRA configurations trained on one shared budget, resumable, chosen on
validation.

A configuration is a dict of :data:`KEYS`: what is trained (rank, targets, learning rate, alpha,
base quantization, and the LoRA variants) and how validation answers are decoded (``sampler``,
``min_new_tokens``); missing keys take the notebook's defaults. Each one lives in
``runs/<RUN_ID>/sweep/<name>/``; its ``result.json``, written last and atomically, marks it
finished, so a rerun skips it and a changed grid trains only what is new. Configurations that differ
in decoding only share one trained adapter (:func:`training_twin`).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from nbutils import evaluation, files, report, training

# quantize: "" (float base) or "int8"
TRAINING_KEYS = (
    "rank",
    "targets",
    "learning_rate",
    "alpha",
    "quantize",
    "scaling",
    "loraplus_ratio",
    "dora",
    "neftune_alpha",
)
DECODING_KEYS = ("sampler", "min_new_tokens")
KEYS = TRAINING_KEYS + DECODING_KEYS
# a variant's value that adds nothing to a configuration's name
PLAIN = {
    "scaling": "standard",
    "loraplus_ratio": 1.0,
    "dora": False,
    "neftune_alpha": 0.0,
    "sampler": "greedy",
    "min_new_tokens": 0,
}
# the notebook parameter of each key (the training ones as ``TrainConfig`` names them)
PARAMETERS = {
    **{k: training.FIELD_PARAMETERS[k] for k in TRAINING_KEYS if k != "quantize"},
    "quantize": "QUANTIZE",
    "sampler": "SAMPLER",
    "min_new_tokens": "MIN_NEW_TOKENS",
}
CSV_COLUMNS = (
    "name",
    *KEYS,
    "trainable_params",
    "trainable_share_pct",
    "adapter_mb",
    "base_mb",
    "updates_run",
    "train_seconds",
    "useful_tokens_per_s",
    "best_val_loss",
    "val_rougeL_f1",
)


def expand(sweep: dict | list, defaults: dict) -> list[dict]:
    """All configurations of a grid ``{"rank": [...], "targets": [...]}``, or an explicit list of
    dicts."""
    if isinstance(sweep, dict):
        grid = {k: v if isinstance(v, (list, tuple)) else [v] for k, v in sweep.items()}
        configs = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    else:
        configs = [dict(c) for c in sweep]
    out = []
    for c in configs:
        unknown = set(c) - set(KEYS)
        if unknown:
            raise ValueError(
                f"SWEEP: unknown key(s) {sorted(unknown)}; a configuration may set {', '.join(KEYS)}."
            )
        full = {**PLAIN, **{k: defaults[k] for k in KEYS if k in defaults}, **c}
        if not isinstance(full["rank"], int) or full["rank"] < 1:
            raise ValueError(f"SWEEP: rank {full['rank']!r} must be a positive integer.")
        training.lora_layer_names(full["targets"])  # one-line error for an unknown target
        # 0 means alpha = rank: one name, one configuration
        full["alpha"] = float(full["alpha"] or full["rank"])
        full["learning_rate"] = float(full["learning_rate"])
        full["loraplus_ratio"], full["neftune_alpha"] = (
            float(full["loraplus_ratio"]),
            float(full["neftune_alpha"]),
        )
        if full["quantize"] not in ("", "int8"):
            raise ValueError(
                f"SWEEP: quantize {full['quantize']!r}: use '' (float base weights) or 'int8'."
            )
        try:  # one-line errors for the variants' and the sampler's values
            training.TrainConfig(**{k: full[k] for k in TRAINING_KEYS[5:]})
            evaluation.make_sampler(full["sampler"])
        except ValueError as error:
            raise ValueError(f"SWEEP: {error}") from None
        if full not in out:
            out.append(full)
    return out


def notebook_defaults(params: dict, settings: dict) -> dict:
    """What a configuration does not say: notebook 05's parameters for training (notebook 03's
    recipe), notebook 02's settings for decoding."""
    return {k: params[PARAMETERS[k]] for k in TRAINING_KEYS} | {
        k: settings.get(k, PLAIN[k]) for k in DECODING_KEYS
    }


def parameters(config: dict) -> dict:
    """A configuration as notebook 03's parameters (no checkpoints: a configuration is short)."""
    return {PARAMETERS[k]: config[k] for k in TRAINING_KEYS if k != "quantize"} | {
        "CHECKPOINT_EVERY": 0
    }


def config_name(config: dict, keys: tuple = KEYS) -> str:
    """A folder name that says what the configuration is, e.g. ``r8-query+value-lr0.0005-a8``, then
    each variant that is not plain (``-rslora``, ``-lp16``, ``-dora``, ``-neft5``, ``-beam4``,
    ``-min8``)."""
    name = f"r{config['rank']}-{config['targets'].replace(',', '+')}-lr{config['learning_rate']:g}-a{config['alpha']:g}"
    tags = {
        "quantize": config.get("quantize"),
        "scaling": config.get("scaling"),
        "loraplus_ratio": f"lp{config.get('loraplus_ratio', 1.0):g}",
        "dora": "dora",
        "neftune_alpha": f"neft{config.get('neftune_alpha', 0.0):g}",
        "sampler": str(config.get("sampler")).replace(":", ""),
        "min_new_tokens": f"min{config.get('min_new_tokens', 0)}",
    }
    for key, tag in tags.items():
        if key in keys and config.get(key, PLAIN.get(key, "")) not in ("", PLAIN.get(key)):
            name += f"-{tag}"
    return name


def training_twin(config: dict, results: list[dict]) -> dict | None:
    """A finished result whose adapter was trained exactly as ``config``'s (the configurations
    differ in decoding only), or None."""
    key = config_name(config, TRAINING_KEYS)
    return next((r for r in results if config_name(r, TRAINING_KEYS) == key), None)


def finished(folder: Path, budget: dict) -> dict | None:
    """The saved result of a finished configuration (None if it has not finished); refuses one
    trained on another budget, which a rerun must not mix in or overwrite."""
    path = Path(folder) / "result.json"
    if not path.exists():
        return None
    # compared as stored (JSON types)
    result, budget = files.read_json(path), json.loads(json.dumps(budget))
    if result["budget"] != budget:
        changed = sorted(
            k
            for k in set(budget) | set(result["budget"])
            if result["budget"].get(k) != budget.get(k)
        )
        raise ValueError(
            f"{folder} was trained with another budget (changed: {', '.join(changed)}); "
            "use a new RUN_ID for a new budget, or delete that folder to retrain it."
        )
    return result


def twin_training(twin: dict) -> dict:
    """A twin's training result, as ``train_lora`` returned it (what :func:`record` reads)."""
    return {
        "updates_run": twin["updates_run"],
        "train_seconds": twin["train_seconds"],
        "useful_tokens_per_s": twin["useful_tokens_per_s"],
        "best_val_loss": twin["best_val_loss"],
        "history": twin["val_curve"],
    }


def record(config: dict, budget: dict, train: dict, params: dict, val_scores: list[dict]) -> dict:
    """One configuration's result: its size, speed, validation loss curve and validation ROUGE-L."""
    return {
        "name": config_name(config),
        **config,
        "budget": budget,
        **params,
        "updates_run": train["updates_run"],
        "train_seconds": train["train_seconds"],
        "useful_tokens_per_s": train["useful_tokens_per_s"],
        "best_val_loss": train["best_val_loss"],
        "val_curve": train["history"],
        "val_rougeL_f1": evaluation.aggregate(val_scores)["rougeL_f1"],
    }


def choose(
    results: list[dict],
    val_scores: dict[str, list[dict]],
    n_bootstrap: int,
    seed: int,
    groups: list[str] | None = None,
) -> dict:
    """The rule: the best validation ROUGE-L; among the configurations whose difference from it has
    a paired-bootstrap 95% CI containing 0 (within noise), the one with the fewest trainable
    parameters."""
    best = max(results, key=lambda r: r["val_rougeL_f1"])
    rows = []
    for r in results:
        if r["name"] == best["name"]:
            ci = [0.0, 0.0]
        else:
            ci = evaluation.paired_bootstrap(
                val_scores[best["name"]], val_scores[r["name"]], n_bootstrap, seed, groups
            )["rougeL_f1"]["ci95"]
        rows.append(
            {
                "name": r["name"],
                "val_rougeL_f1": r["val_rougeL_f1"],
                "diff_vs_best_ci95": ci,
                "within_noise": bool(ci[1] >= 0),
                "trainable_params": r["trainable_params"],
            }
        )
    candidates = [c for c in rows if c["within_noise"]]
    chosen = min(candidates, key=lambda c: (c["trainable_params"], -c["val_rougeL_f1"]))
    return {
        "best": best["name"],
        "chosen": chosen["name"],
        "candidates": [c["name"] for c in candidates],
        "table": rows,
    }


def conclusion(choice: dict, results: list[dict]) -> str:
    """The notebook's conclusion, every sentence built from the numbers."""
    by = {r["name"]: r for r in results}
    best, chosen = by[choice["best"]], by[choice["chosen"]]
    text = [
        f"Best validation ROUGE-L: {best['name']} ({best['val_rougeL_f1']:.3f}, "
        f"{best['trainable_params']:,} trainable parameters)."
    ]
    others = [c for c in choice["candidates"] if c != best["name"]]
    if others:
        text.append(
            f"{len(others)} other configuration(s) are within its bootstrap noise ({', '.join(others)})."
        )
    else:
        text.append("Every other configuration is below it beyond bootstrap noise.")
    if chosen["name"] != best["name"]:
        text.append(
            f"Chosen: {chosen['name']}, the smallest of those ({chosen['trainable_params']:,} parameters, "
            f"{chosen['trainable_params'] / best['trainable_params']:.0%} of the best's; "
            f"validation ROUGE-L {chosen['val_rougeL_f1']:.3f})."
        )
    elif others:
        text.append(f"Chosen: {chosen['name']} itself, which is also the smallest of them.")
    else:
        text.append(f"Chosen: {chosen['name']}.")
    return " ".join(text)


def choice_parameters(result: dict) -> dict:
    """The chosen configuration as notebook parameters (``--params`` or a profile takes them): the
    four core ones, and each variant that is not plain."""
    params = {
        "RANK": int(result["rank"]),
        "LORA_TARGETS": result["targets"],
        "LEARNING_RATE": float(result["learning_rate"]),
        "LORA_ALPHA": float(result["alpha"]),
    }
    if result.get("quantize"):
        params["QUANTIZE"] = result["quantize"]
    for key, plain in PLAIN.items():
        if result.get(key, plain) != plain:
            params[PARAMETERS[key]] = result[key]
    return params


def test_sentence(chosen: str, default: str, vs_base: dict, vs_default: dict) -> str:
    """The test result in words, from the paired bootstrap numbers."""

    def verdict(c: dict) -> str:
        lo, hi = c["ci95"]
        return "above 0" if lo > 0 else ("below 0" if hi < 0 else "containing 0")

    base, other = vs_base["rougeL_f1"], vs_default["rougeL_f1"]
    text = (
        f"On the test split, {chosen} scores ROUGE-L {base['tuned']:.3f} against the base model's {base['baseline']:.3f} "
        f"({base['diff']:+.3f}, 95% CI [{base['ci95'][0]:+.3f}, {base['ci95'][1]:+.3f}], {verdict(base)})."
    )
    if chosen == default:
        return text + " The chosen configuration is the default one."
    return text + (
        f" Against the default {default} ({other['baseline']:.3f}) the difference is {other['diff']:+.3f}, "
        f"95% CI [{other['ci95'][0]:+.3f}, {other['ci95'][1]:+.3f}] ({verdict(other)})."
    )


def report_markdown(
    run_id: str, results: list[dict], choice: dict, conclusion: str, test_text: str, test_table: str
) -> str:
    """``sweep_report.md``."""
    return "\n".join(
        [
            f"# LoRA sweep: run {run_id}",
            "",
            f"{len(results)} configurations on one budget (`sweep_results.csv`).",
            "",
            report.table(results, CSV_COLUMNS),
            "",
            "![sweep](sweep.png)",
            "",
            "## Choice (validation only)",
            "",
            conclusion,
            "",
            report.table(
                choice["table"],
                ("name", "val_rougeL_f1", "diff_vs_best_ci95", "within_noise", "trainable_params"),
            ),
            "",
            "## Test split (the chosen adapter, once)",
            "",
            test_text,
            "",
            test_table,
            "",
        ]
    )

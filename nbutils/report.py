"""Markdown tables and the run's ``report.md`` (notebook 04)."""

from __future__ import annotations

from pathlib import Path

from nbutils import files

LABELS = {
    "rougeL_f1": "ROUGE-L F1",
    "chrf": "chrF (corpus)",
    "exact_match": "exact match",
    "response_loss": "response loss (nats/token)",
    "perplexity": "perplexity",
    "stop_rate": "stop rate",
    "mean_tokens": "mean answer tokens",
}


def _cell(text: str, width: int = 140) -> str:
    """Text safe for one Markdown table cell."""
    text = " ".join(str(text).replace("|", "\\|").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(rows: list[dict], columns: tuple) -> str:
    """A Markdown table of ``rows`` (floats to 3 significant decimals, big integers with
    separators)."""

    def fmt(v) -> str:
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.3f}"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else _cell(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def comparison_table(comparison: dict) -> str:
    """Metric | baseline | tuned | difference | 95% CI."""
    lines = [
        "| metric | baseline | tuned | difference | 95% CI of difference |",
        "|---|---:|---:|---:|---|",
    ]
    for key, label in LABELS.items():
        if key in comparison:
            c = comparison[key]
            lines.append(
                f"| {label} | {c['baseline']:.3f} | {c['tuned']:.3f} | {c['diff']:+.3f} | "
                f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] |"
            )
    return "\n".join(lines)


def examples_table(rows: list[dict], baseline: list[dict], tuned: list[dict], n: int = 8) -> str:
    """Prompt input, reference, baseline and tuned answers for the first ``n`` test rows."""
    lines = ["| input | reference | baseline | tuned |", "|---|---|---|---|"]
    for row, b, t in list(zip(rows, baseline, tuned))[:n]:
        prompt = row.get("input") or row["instruction"]
        lines.append(
            f"| `{_cell(prompt, 90)}` | {_cell(row['output'])} | {_cell(b['prediction'])} | {_cell(t['prediction'])} |"
        )
    return "\n".join(lines)


def own_prompts_table(baseline: list[dict], tuned: list[dict]) -> str:
    """Each of the user's prompts with the base and the tuned model's answers."""
    lines = ["| prompt | base model | tuned |", "|---|---|---|"]
    for b, t in zip(baseline, tuned, strict=True):
        prompt = b.get("instruction", b["prompt"])
        lines.append(
            f"| `{_cell(prompt, 120)}` | {_cell(b['prediction'])} | {_cell(t['prediction'])} |"
        )
    return "\n".join(lines)


def write_report(out: Path, metrics: dict, examples: str) -> Path:
    """``report.md``: settings, adapter, comparison table, chart and examples."""
    s, a = metrics["settings"], metrics["adapter"]
    text = "\n".join(
        [
            f"# LoRA fine-tuning report: {s['model']} on {s['dataset']}",
            "",
            f"- Test rows: {metrics['n_test_rows']}; template `{s['template']}`, stop token `{s['stop_token']}`; sampler `{s['sampler']}`; "
            f"max new tokens {s['max_new_tokens']}; seed {s['seed']}.",
            f"- Adapter: rank {a['rank']}, targets `{a['targets']}`, alpha {a['alpha']}.",
            "",
            f"## Baseline vs tuned (paired 95% CI: {next(iter(metrics['comparison'].values()))['ci_method']})",
            "",
            comparison_table(metrics["comparison"]),
            "",
            "![metrics](metrics.png)",
            "",
            "## Examples",
            "",
            examples,
            "",
        ]
    )
    path = Path(out) / "report.md"
    return files.write_text(path, text)

"""Every parameter of the series, defined once: name, default, allowed values, notebooks, help.

The notebooks' ``parameters`` cells, the profiles, ``training.TrainConfig``, the pipeline's ``-p``
checks, ``--help`` and ``docs/parameters.md`` all derive from ``PARAMS`` and ``PROFILES``;
``python -m nbutils.config --write-cells`` rewrites the cells, and a test fails when they drift.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import sys
from dataclasses import dataclass

from nbutils import paths

NOTEBOOKS = (
    "01_prepare_data",
    "02_baseline_inference",
    "03_lora_finetune",
    "04_evaluate",
    "05_experiments",
    "06_export",
)
ALL = ("01", "02", "03", "04", "05", "06")
TRAINING = ("03", "05")


@dataclass(frozen=True)
class Param:
    """One parameter: its default (which fixes its type), help, group and notebooks."""

    name: str
    default: object
    group: str
    notebooks: tuple[str, ...]
    help: str
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None  # exclusive, like LEARNING_RATE's 1


def _params(*rows: tuple) -> dict[str, Param]:
    """``PARAMS`` from rows of (name, default, group, notebooks, help[, choices[, minimum]])."""
    return {row[0]: Param(*row) for row in rows}


PARAMS = _params(
    # data (notebook 01)
    ("MODEL", "auto", "model", ALL, "'auto' (embedded 270M offline, preset on Kaggle), 'tiny', a keras-hub preset, a folder or .gguf"),
    ("DATASET", "pycode-summary", "data", ALL, "built-in task, 'hf:<owner>/<name>', 'kaggle:<owner>/<dataset>'; the data/processed folder name"),
    ("DATA_PATH", "", "data", ("01",), "your own file: Alpaca .json/.jsonl, Dolly .jsonl, .csv/.tsv"),
    ("DATA_FORMAT", "", "data", ("01",), "force a format ('' detects it)", ("", "alpaca", "dolly", "csv", "tsv")),
    ("COLUMNS", {}, "data", ("01",), "CSV/TSV: {'instruction': <column>, 'input': <column>, 'output': <column>}"),
    ("CATEGORIES", "", "data", ("01",), "Dolly: comma-separated categories to keep"),
    ("TEST_PATH", "", "data", ("01",), "a separate file that replaces the test split"),
    ("TEMPLATE", "auto", "data", ("01",), "'auto': Gemma's chat turns of the model's family; or a style", ("auto", "gemma", "gemma4", "alpaca")),
    ("STOP_TOKEN", "auto", "data", ("01",), "'auto': <eos> for base models, end of turn for instruct; or a token"),
    ("SEQUENCE_LENGTH", 256, "data", ("01",), "prompt + response tokens; longer prompts are truncated", (), 16),
    ("VAL_SIZE", 0.1, "data", ("01",), "validation split: a fraction (< 1) or a row count", (), 0),
    ("TEST_SIZE", 0.1, "data", ("01",), "test split: a fraction (< 1) or a row count", (), 0),
    ("MAX_TRAIN", 0, "data", ("01",), "cap on training rows (0: no cap)", (), 0),
    ("MAX_VAL", 0, "data", ("01",), "cap on validation rows (0: no cap)", (), 0),
    ("MAX_TEST", 0, "data", ("01",), "cap on test rows (0: no cap)", (), 0),
    ("MAX_SOURCE_TOKENS", 192, "data", ("01",), "built-in task: skip functions whose source is longer", (), 1),
    # run
    ("RUN_ID", "manual", "run", ALL[1:], "outputs go to runs/<RUN_ID>/"),
    ("SEED", 0, "run", ("01", "02", "03", "04", "05"), "seeds the split, the adapters, the data order and sampling", (), 0),
    # generation (notebook 02; 04 and 05 reuse 02's settings)
    ("MAX_TEST_ROWS", 0, "generation", ("02",), "test rows to answer (0: the whole split)", (), 0),
    ("MAX_NEW_TOKENS", 48, "generation", ("02",), "answer length cap", (), 1),
    ("SAMPLER", "greedy", "generation", ("02",), "'greedy', 'beam:<beams>', 'top_k:<k>' or 'top_p:<p>' (seeded)"),
    ("MIN_NEW_TOKENS", 0, "generation", ("02",), "the stop token is barred for the first this many new tokens", (), 0),
    ("GEN_BATCH_SIZE", 16, "generation", ("02",), "prompts decoded together", (), 1),
    # LoRA (notebooks 03 and 05)
    ("RANK", 8, "lora", TRAINING, "LoRA rank r: adapters are (d x r) and (r x k)", (), 1),
    ("LORA_TARGETS", "query,value", "lora", TRAINING, "'query,value', 'attention', 'all', or a list of query,key,value,output,gate,up,down"),
    ("LORA_ALPHA", 0.0, "lora", TRAINING, "the update is scaled by alpha / rank; 0 means alpha equal to the rank", (), 0),
    ("LORA_SCALING", "standard", "lora", TRAINING, "'standard': alpha / r; 'rslora': alpha / sqrt(r) (rank-stabilised)", ("standard", "rslora")),
    ("LORAPLUS_RATIO", 1.0, "lora", TRAINING, "LoRA+: B's learning rate over A's (1: plain LoRA)", (), 1e-12),
    ("DORA", False, "lora", TRAINING, "DoRA: a trained magnitude per output unit times the normalised W + s·A·B"),
    ("NEFTUNE_ALPHA", 0.0, "lora", TRAINING, "NEFTune: noise alpha / sqrt(L·d) on the embeddings while training (0: off)", (), 0),
    # training (notebooks 03 and 05)
    ("LEARNING_RATE", 2e-4, "training", TRAINING, "AdamW peak learning rate, in (0, 1)", (), 1e-12, 1),
    ("WEIGHT_DECAY", 0.01, "training", TRAINING, "AdamW decoupled weight decay (not on biases and norm scales)", (), 0),
    ("WARMUP_STEPS", 10, "training", TRAINING, "linear warmup updates", (), 0),
    ("SCHEDULE", "cosine", "training", TRAINING, "decay after warmup", ("cosine", "linear")),
    ("CLIPNORM", 1.0, "training", TRAINING, "clip the global norm of all adapter gradients (0: off)", (), 0),
    ("BATCH_SIZE", 4, "training", TRAINING, "rows per batch", (), 1),
    ("GRAD_ACCUM", 1, "training", TRAINING, "batches per optimizer update", (), 1),
    ("MAX_BATCH_TOKENS", 0, "training", ("03",), "run a batch over this many tokens as smaller steps of one update (0: whole)", (), 0),
    ("EPOCHS", 1.0, "training", TRAINING, "passes over the train split (when MAX_STEPS is 0)", (), 0),
    ("MAX_STEPS", 0, "training", TRAINING, "optimizer updates (0: EPOCHS passes); 05: per configuration", (), 0),
    ("EVAL_EVERY", 25, "training", TRAINING, "validation loss every this many updates", (), 1),
    ("PATIENCE", 3, "training", TRAINING, "early stopping: evaluations without improvement", (), 1),
    ("MIN_DELTA", 0.0, "training", TRAINING, "early stopping: a fall of the validation loss by less is no improvement", (), 0),
    ("CHECKPOINT_EVERY", 50, "training", ("03",), "updates between checkpoints (0: none)", (), 0),
    ("KEEP_CHECKPOINTS", 2, "training", ("03",), "newest checkpoints kept", (), 1),
    ("RESUME", False, "training", ("03",), "continue from RUN_ID's latest checkpoint"),
    ("RESUME_FROM", "", "training", ("03",), "latest checkpoint of a folder or attached kernel <owner>/<kernel>"),
    ("MAX_VAL_ROWS", 0, "training", TRAINING, "validation rows used (0: the whole split)", (), 0),
    ("MIXED_PRECISION", "auto", "hardware", ("02", "03", "04", "05"), "'auto': bf16 on TPU and GPUs of compute capability 8.0+, else fp32; weights in bf16 where fp32 cannot fit", ("auto", "bf16", "bf16-weights", "fp32", "fp16")),
    ("DISTRIBUTION", "auto", "hardware", TRAINING, "'auto', 'none', 'data' or 'model:<data>x<model>'"),
    ("REQUIRE_ACCELERATOR", False, "hardware", TRAINING, "stop at once when JAX sees only the CPU"),
    # evaluation and experiments
    ("N_BOOTSTRAP", 1000, "evaluation", ("04", "05"), "paired bootstrap resamples", (), 10),
    ("PROMPTS", ["What does this do? def area(r): return 3.14 * r * r"], "evaluation", ("04",), "prompts to try, base vs tuned"),
    ("SWEEP", {"rank": [1, 2, 4, 8, 16, 32], "targets": ["query,value", "all"]}, "experiments", ("05",), "grid or config list"),
    ("QUANTIZE", "", "experiments", ("05",), "base weights where a configuration does not say ('' float, 'int8' QLoRA-style)", ("", "int8")),
    # export
    ("EXPORTS", "keras,transformers,gguf", "export", ("06",), "formats, comma-separated (each a full copy of the model)"),
    ("TOLERANCE", 1e-3, "export", ("06",), "max |logit difference| allowed for a merged export", (), 0),
)  # fmt: skip

SERIES = (*NOTEBOOKS[:4], NOTEBOOKS[5])
SWEEP_SERIES = (NOTEBOOKS[0], NOTEBOOKS[1], NOTEBOOKS[4])


@dataclass(frozen=True)
class Profile:
    """A named set of overrides, what it is for, and the notebooks it runs."""

    purpose: str
    values: dict
    series: tuple = SERIES


_SMOKE = {
    "MODEL": "tiny",
    "SEQUENCE_LENGTH": 192,
    "MAX_SOURCE_TOKENS": 128,
    "MAX_TRAIN": 24,
    "MAX_VAL": 8,
    "MAX_TEST": 8,
    "MAX_STEPS": 4,
    "EVAL_EVERY": 2,
    "BATCH_SIZE": 4,
    "MAX_BATCH_TOKENS": 256,
    "MAX_NEW_TOKENS": 8,
    "GEN_BATCH_SIZE": 4,
    "N_BOOTSTRAP": 200,
}
_CPU = {
    "MODEL": "gemma3_270m_local",
    "SEQUENCE_LENGTH": 160,
    "MAX_SOURCE_TOKENS": 112,
    "MAX_TRAIN": 1600,
    "MAX_VAL": 48,
    "MAX_TEST": 200,
    "RANK": 8,
    "LORA_TARGETS": "all",
    "LEARNING_RATE": 5e-4,
    "MAX_STEPS": 75,
    "BATCH_SIZE": 4,
    "MAX_BATCH_TOKENS": 192,
    "EVAL_EVERY": 25,
    "MIN_DELTA": 0.005,
    "WARMUP_STEPS": 20,
    "MAX_NEW_TOKENS": 40,
    "GEN_BATCH_SIZE": 20,
}
_KAGGLE = {
    "MODEL": "gemma3_1b",
    "SEQUENCE_LENGTH": 256,
    "RANK": 16,
    "LORA_TARGETS": "all",
    "EPOCHS": 2,
    "EVAL_EVERY": 50,
    "MAX_NEW_TOKENS": 48,
    "REQUIRE_ACCELERATOR": True,
}
PROFILES = {
    "smoke": Profile("plumbing check (the tests)", _SMOKE),
    "cpu": Profile("the default `make run`: real 270M on a 2-core CPU", _CPU),
    "alpaca": Profile(
        "Alpaca-format data from the hub (online) or -p DATA_PATH",
        {
            "MODEL": "gemma3_270m_local",
            "DATASET": "hf:yahma/alpaca-cleaned",
            "SEQUENCE_LENGTH": 192,
            "MAX_TRAIN": 400,
            "MAX_VAL": 32,
            "MAX_TEST": 60,
            "LORA_TARGETS": "all",
            "LEARNING_RATE": 5e-4,
            "MAX_STEPS": 60,
            "BATCH_SIZE": 4,
            "EVAL_EVERY": 20,
            "MAX_NEW_TOKENS": 96,
            "GEN_BATCH_SIZE": 20,
        },
    ),
    "kaggle": Profile(
        "Kaggle's two T4s: batches of 8 (4 per GPU, data parallel) x 2 accumulated",
        {**_KAGGLE, "BATCH_SIZE": 8, "GRAD_ACCUM": 2, "GEN_BATCH_SIZE": 32},
    ),
    "kaggle-tpu": Profile(
        "Kaggle TPU v5e-8: data parallel over 8 cores",
        {**_KAGGLE, "BATCH_SIZE": 16, "GEN_BATCH_SIZE": 64, "DISTRIBUTION": "data"},
    ),
    "kaggle-gemma4": Profile(
        "Gemma 4 E2B instruct on two T4s: weights in bf16 (fp32 cannot fit), 2 rows per GPU x 4",
        {
            **_KAGGLE,
            "MODEL": "gemma4_instruct_2b",
            "BATCH_SIZE": 4,
            "GRAD_ACCUM": 4,
            "GEN_BATCH_SIZE": 16,
        },
        SERIES[:4],  # 06 checks exports in fp32 on one device: E2B's 20 GB fit neither
    ),
    "kaggle-tpu-gemma4": Profile(
        "Gemma 4 E2B instruct on a TPU v5e-8: weights split over 2 chips, 4 data groups",
        {
            **_KAGGLE,
            "MODEL": "gemma4_instruct_2b",
            "BATCH_SIZE": 16,
            "GEN_BATCH_SIZE": 32,
            "DISTRIBUTION": "model:4x2",
        },
        SERIES[:4],
    ),
    "kaggle-cpu": Profile("Kaggle without an accelerator", {**_CPU, "MODEL": "gemma3_270m"}),
    "kaggle-smoke": Profile(
        "Kaggle plumbing on the accelerator in minutes: 4 updates, generation, export checks",
        {**_SMOKE, "MODEL": "gemma3_270m", "MAX_NEW_TOKENS": 16, "REQUIRE_ACCELERATOR": True},
    ),
    "sweep-smoke": Profile(
        "notebook 05 plumbing (the tests)",
        {
            **_SMOKE,
            # two float configurations and an int8 default: both kinds of base are trained; the
            # third decodes the first's adapter with beam search (trained once)
            "SWEEP": [
                {"rank": 2, "quantize": ""},
                {"rank": 4, "quantize": ""},
                {"rank": 2, "quantize": "", "sampler": "beam:2"},
            ],
            "RANK": 2,
            "QUANTIZE": "int8",
            "LEARNING_RATE": 5e-4,
            "MAX_STEPS": 3,
            "N_BOOTSTRAP": 100,
        },
        SWEEP_SERIES,
    ),
    "sweep-cpu": Profile(
        "notebook 05 on the 2-core CPU",
        {
            **_CPU,
            "MAX_TRAIN": 1200,
            "MAX_VAL": 32,
            "MAX_TEST": 100,
            "SWEEP": {"rank": [2, 8, 32], "targets": ["query,value", "all"]},
            "LORA_TARGETS": "query,value",
            "MAX_STEPS": 80,
            "EVAL_EVERY": 40,
            "WARMUP_STEPS": 10,
            "GEN_BATCH_SIZE": 16,
        },
        SWEEP_SERIES,
    ),
    "variants-cpu": Profile(
        "notebook 05 on the 2-core CPU: LoRA variants and decoding beside plain LoRA",
        {
            **_CPU,
            "SWEEP": [
                {},
                {"scaling": "rslora"},
                {"loraplus_ratio": 16.0},
                {"dora": True},
                {"neftune_alpha": 5.0},
                {"sampler": "beam:4"},
                {"min_new_tokens": 8},
            ],
        },
        SWEEP_SERIES,
    ),
}


class ParameterError(ValueError):
    """A parameter value the series cannot use (the message names it and what to do)."""


def default(name: str):
    """The default of parameter ``name``."""
    return PARAMS[name].default


def defaults(notebook: str) -> dict:
    """Every parameter notebook ``notebook`` (e.g. ``"03"``) takes, with its default."""
    return {p.name: p.default for p in PARAMS.values() if notebook[:2] in p.notebooks}


def unknown(name: str) -> ParameterError:
    """The error for a name no notebook takes, with the closest known names."""
    close = difflib.get_close_matches(name, PARAMS, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "see --help for the list."
    return ParameterError(f"{name}: no notebook has this parameter; {hint}")


def check(name: str, value) -> None:
    """Raise a one-line ParameterError when ``value`` does not fit parameter ``name``."""
    if name not in PARAMS:
        raise unknown(name)
    p = PARAMS[name]
    kind = type(p.default)
    if name == "SWEEP":
        kind = (dict, list)
    elif kind is float:
        kind = (int, float)
    if isinstance(value, bool) and p.default is not None and type(p.default) is not bool:
        raise ParameterError(f"{name}={value!r}: expected {type(p.default).__name__}, not a bool.")
    if not isinstance(value, kind):
        want = type(p.default).__name__
        raise ParameterError(f"{name}={value!r}: expected {want} (default {p.default!r}).")
    if p.choices and value not in p.choices:
        raise ParameterError(f"{name}={value!r}: use one of {', '.join(map(repr, p.choices))}.")
    if p.minimum is not None and (not math.isfinite(value) or value < p.minimum):
        raise ParameterError(f"{name}={value!r}: must be a number >= {p.minimum}.")
    if p.maximum is not None and value >= p.maximum:
        raise ParameterError(f"{name}={value!r}: must be a number below {p.maximum}.")


def parse(name: str, text: str):
    """A ``-p NAME VALUE`` value: a Python literal where the parameter is not a string, checked."""
    if name not in PARAMS:
        raise unknown(name)
    value = text
    if not isinstance(PARAMS[name].default, str):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            pass
    check(name, value)
    return value


def check_all(values: dict) -> None:
    """Check every value of ``values`` (one-line error for the first that does not fit)."""
    for name, value in values.items():
        check(name, value)


def literal(value) -> str:
    """``value`` as Python source the way ``ruff format`` writes it (double quotes)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    return repr(value)


def cell(notebook: str) -> str:
    """The source of notebook ``notebook``'s parameters cell, one line per parameter."""
    return "\n".join(
        f"{name} = {literal(PARAMS[name].default)}  # {PARAMS[name].help}"
        for name in defaults(notebook)
    )


def profiles_table() -> str:
    """The profiles as a Markdown table (what each sets and runs)."""
    lines = ["| profile | runs | what for | sets |", "|---|---|---|---|"]
    for name, prof in PROFILES.items():
        runs = " → ".join(n[:2] for n in prof.series)
        sets = ", ".join(f"`{k}={v!r}`" for k, v in prof.values.items())
        lines.append(f"| `{name}` | {runs} | {prof.purpose} | {sets} |")
    return "\n".join(lines)


def parameters_table() -> str:
    """Every parameter as Markdown tables, one per group."""
    out, group = [], None
    for p in PARAMS.values():
        if p.group != group:
            group = p.group
            out += ["", f"### {group}", "", "| name | default | notebooks | meaning |"]
            out.append("|---|---|---|---|")
        allowed = f" One of {', '.join(f'`{c!r}`' for c in p.choices)}." if p.choices else ""
        meaning = p.help.replace("|", "\\|") + allowed
        out.append(f"| `{p.name}` | `{p.default!r}` | {', '.join(p.notebooks)} | {meaning} |")
    return "\n".join(out).strip()


def markdown() -> str:
    """``docs/parameters.md``: the profiles and every parameter."""
    return (
        "# Parameters and profiles\n\n"
        "Generated from `nbutils/config.py` by `python -m nbutils.config --markdown`; do not edit.\n"
        "Override a parameter with `python -m nbutils.pipeline -p NAME VALUE`, or in a notebook's\n"
        "`parameters` cell.\n\n## Profiles\n\n"
        f"{profiles_table()}\n\n## Parameters\n{parameters_table()}\n"
    )


def write_cells() -> list[str]:
    """Rewrite every notebook's parameters cell from ``PARAMS``; returns the notebooks changed."""
    changed = []
    for name in NOTEBOOKS:
        path = paths.NOTEBOOKS_DIR / f"{name}.py"
        text = path.read_text()
        head, marker, rest = text.partition('# %% tags=["parameters"]\n')
        _, sep, tail = rest.partition("\n# %%")
        new = f"{head}{marker}{cell(name)}\n\n{sep.lstrip()}{tail}" if marker else text
        if new != text:
            path.write_text(new)
            changed.append(name)
    return changed


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-cells"]:
        print("rewritten:", ", ".join(write_cells()) or "none")
    elif sys.argv[1:] == ["--markdown"]:
        print(markdown(), end="")
    else:
        sys.exit("usage: python -m nbutils.config --write-cells | --markdown")

# %% [markdown]
# # 01 · Prepare the data
#
# **Purpose:** turn a data source into clean, tokenizer-checked train/val/test splits that every
# later
# notebook reads, rendered with **one** prompt template so training and evaluation never disagree.
#
# - **Reads:** the built-in `pycode-summary` task (mined from this Python's standard library), or
# your
#   own Alpaca/Dolly JSON(L) or CSV/TSV file via `DATA_PATH`.
# - **Writes:** `data/processed/<dataset>/{train,val,test}.jsonl`, `manifest.json`,
# `token_lengths.png`.
# - **Previous:** none (start here) · **Next:** `02_baseline_inference`

# %%
# Setup, the same in every notebook: on Kaggle, install this series' code from its attached dataset
# and pick up earlier notebooks' outputs (elsewhere that part does nothing); then load the
# frameworks quietly.
import os

if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
    import glob
    import shutil
    import subprocess
    import sys

    # at the top of the code dataset (both mount layouts are searched)
    marker = "requirements-kaggle.txt"
    found = sorted(
        glob.glob(f"/kaggle/input/*/{marker}") + glob.glob(f"/kaggle/input/*/*/*/{marker}")
    )
    if not found:
        raise SystemExit(
            "Attach this series' code dataset first (Add Input → Datasets); see README 'Run on Kaggle'."
        )
    code = "/kaggle/working/gemma-lora"
    # contents only: inputs are read-only
    copy = dict(dirs_exist_ok=True, copy_function=shutil.copyfile)
    shutil.copytree(os.path.dirname(found[0]), code, **copy)
    # `kaggle datasets create --dir-mode zip` uploads folders as zips
    for archive in glob.glob(f"{code}/*.zip"):
        shutil.unpack_archive(archive, archive[: -len(".zip")])
    # earlier notebooks' kernel outputs, oldest first: the latest wins
    for kind in ("data/processed", "runs"):
        for earlier in sorted(
            glob.glob(f"/kaggle/input/*/{kind}") + glob.glob(f"/kaggle/input/*/*/*/{kind}")
        ):
            shutil.copytree(earlier, f"/kaggle/working/{kind}", **copy)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--find-links",
        f"{code}/wheels",
    ]
    subprocess.run([*pip, "-r", f"{code}/requirements-kaggle.txt"], check=True)
    sys.path.insert(0, code)
    os.environ["KERAS_BACKEND"] = "jax"
    # let JAX use the whole accelerator
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "1.00")
    print(
        f"Kaggle: code from {os.path.dirname(found[0])} in {code}; missing packages installed from its wheels."
    )

from nbutils import quiet

# JAX, Keras, keras-hub: their start-up log lines filtered out, real errors kept
quiet.load_frameworks()

# %%
from IPython.display import Image, display

from nbutils import data, models, plots, prompts, sequences

# %% tags=["parameters"]
# whose tokenizer measures lengths: "auto", "gemma3_270m_local", "tiny", a keras-hub preset…
MODEL = "auto"
# used when DATA_PATH is empty: "pycode-summary", "hf:<owner>/<name>", "kaggle:<owner>/<dataset>"
DATASET = "pycode-summary"
DATA_PATH = ""  # your own file: Alpaca .json/.jsonl, Dolly .jsonl, or .csv/.tsv (format detected)
DATA_FORMAT = ""  # force one of "alpaca", "dolly", "csv", "tsv"
COLUMNS = {}  # CSV/TSV only: {"instruction": "<column>", "input": "<column>", "output": "<column>"}
CATEGORIES = ""  # Dolly only: comma-separated categories to keep, e.g. "summarization,closed_qa"
TEST_PATH = ""  # optional separate test file that replaces the test split
TEMPLATE = "gemma"  # "gemma" (chat turns) or "alpaca" (### Instruction / ### Response)
# "<eos>" for base models, "<end_of_turn>" for instruction-tuned ones; or name one
STOP_TOKEN = "auto"
# prompt + response tokens; longer rows get their prompt truncated or are dropped
SEQUENCE_LENGTH = 256
VAL_SIZE = 0.1  # fraction (< 1) or row count
TEST_SIZE = 0.1
MAX_TRAIN = 0  # caps for quick CPU runs; 0 means no cap
MAX_VAL = 0
MAX_TEST = 0
MAX_SOURCE_TOKENS = 192  # built-in task: skip functions whose source is longer
SEED = 0

# %% [markdown]
# ## 1. The prompt template
# Training targets, baseline prompts, evaluation and generation all render an example the same way.
# Every training target ends with the **stop token**, the single token id generation stops on. With
# `STOP_TOKEN = "auto"` that is `<eos>` for base models: a base Gemma never learned `<end_of_turn>`
# (its embedding is one of thousands of near-identical untrained rows), so it could not learn to
# stop
# on it; instruction-tuned models use `<end_of_turn>`.

# %%
# "auto": the embedded model offline, the keras-hub preset on Kaggle
MODEL = models.choose_model(MODEL)
template = prompts.Template.for_model(TEMPLATE, MODEL, STOP_TOKEN)
example = {
    "instruction": "Summarize in one sentence.",
    "input": "def add(a, b):\n    return a + b",
    "output": "Add two numbers.",
}
print(prompts.render_prompt(example, template) + example["output"] + template.stop)

# %% [markdown]
# ## 2. Load
# Structural problems (not JSON, a required field missing everywhere, an unknown format) stop here
# with
# one line naming the file and what to do.

# %%
tokenizer = models.load_tokenizer(MODEL)
categories = [c.strip() for c in CATEGORIES.split(",") if c.strip()] or None
rows, source = data.load_source(
    DATASET, DATA_PATH, DATA_FORMAT, COLUMNS or None, categories, tokenizer, MAX_SOURCE_TOKENS
)
print(
    f"{len(rows):,} rows from {source['source']} ({source['format']}, sha256 {source['sha256'][:12]}…)"
)

# %% [markdown]
# ## 3. Validate
# Rows with a missing or empty field, duplicates and rows that cannot fit `SEQUENCE_LENGTH` are
# dropped and counted by reason; over-long *prompts* are truncated (never the response or its stop
# token).

# %%
kept, drops = data.validate(rows, tokenizer, template, SEQUENCE_LENGTH, source["source"])
print(data.counts_table(drops, len(rows)))

# %% [markdown]
# ## 4. Split
# A fixed seed makes the split reproducible. The built-in task splits **by top-level module**, so
# near-identical code from one module never lands in both train and test. `TEST_PATH`, if set,
# replaces the test split (and its prompts are removed from train/val).

# %%
test_rows = None
if TEST_PATH:
    test_rows, source["test_file"] = data.load_test_file(
        TEST_PATH, tokenizer, template, SEQUENCE_LENGTH, DATA_FORMAT, COLUMNS or None, categories
    )
splits, drops["also_in_TEST_PATH"] = data.split(kept, VAL_SIZE, TEST_SIZE, SEED, test_rows)
splits = data.cap_splits(splits, {"train": MAX_TRAIN, "val": MAX_VAL, "test": MAX_TEST}, SEED)
print({name: len(split) for name, split in splits.items()})

# %% [markdown]
# ## 5. What the model sees: the token layout
# `<bos>` + prompt, then the response followed by the stop token. Only the response tokens (and the
# stop token) count in the training loss.

# %%
prompt_ids, target_ids = sequences.encode_example(tokenizer, splits["train"][0], template)
print("prompt ids:", prompt_ids[:12], "…", prompt_ids[-6:], f"({len(prompt_ids)} tokens)")
print(
    "target ids:",
    target_ids,
    f"(ends with {template.stop} = id {sequences.stop_token_id(tokenizer, template)})",
)

# %% [markdown]
# ## 6. Token lengths, and write the splits
# The histogram shows whether `SEQUENCE_LENGTH` fits the data: everything right of the dashed line
# had
# its prompt truncated or was dropped. The splits and a manifest (source hash, drop counts, split
# hashes, package versions) are written atomically.

# %%
all_rows = [r for name in data.SPLITS for r in splits[name]]
lengths = sequences.lengths(tokenizer, all_rows, template)
name = data.dataset_name(DATASET, DATA_PATH)
manifest = data.write_processed(
    name,
    splits,
    lengths,
    source=source,
    template=template.style,
    stop_token=template.stop,
    model_for_tokenizer=MODEL,
    seed=SEED,
    rows_read=len(rows),
    drops=dict(sorted(drops.items())),
    params={
        "sequence_length": SEQUENCE_LENGTH,
        "val_size": VAL_SIZE,
        "test_size": TEST_SIZE,
        "max_train": MAX_TRAIN,
        "max_val": MAX_VAL,
        "max_test": MAX_TEST,
        "data_format": DATA_FORMAT,
        "columns": COLUMNS,
        "categories": categories,
        "test_path": TEST_PATH,
        "max_source_tokens": MAX_SOURCE_TOKENS,
    },
)
out_dir = data.processed_dir(name)
plots.token_length_histogram(
    *lengths, SEQUENCE_LENGTH, manifest["truncated_share"], out_dir / "token_lengths.png"
)
display(Image(filename=str(out_dir / "token_lengths.png")))
print(manifest["token_lengths"])

# %% [markdown]
# ## Summary
# The checks below fail loudly if a split is missing, empty, or not what the manifest says.

# %%
written, _ = data.load_processed(name)
for split in data.SPLITS:
    assert len(written[split]) == manifest["counts"][split] > 0, split
    assert all(r["output"].strip() and r["instruction"].strip() for r in written[split]), split
assert max(p + t for p, t in zip(*lengths)) <= SEQUENCE_LENGTH
assert target_ids[-1] == sequences.stop_token_id(tokenizer, template)
if "modules_per_split" in manifest:
    m = manifest["modules_per_split"]
    assert not (set(m["train"]) & set(m["test"])) and not (set(m["val"]) & set(m["test"]))
print(f"OK: wrote {out_dir} with {manifest['counts']}")

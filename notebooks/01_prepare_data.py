# %% [markdown]
# # 01 · Prepare the data
#
# **Purpose:** turn a data source into clean, tokenizer-checked train/val/test splits that every
# later notebook reads, rendered with **one** prompt template so training and evaluation never
# disagree.
#
# - **Reads:** the built-in `pycode-summary` task (mined from this Python's standard library), or
#   your own Alpaca/Dolly JSON(L) or CSV/TSV file via `DATA_PATH`.
# - **Writes:** `data/processed/<dataset>/{train,val,test}.jsonl`, `manifest.json`,
# `token_lengths.png`.
# - **Previous:** none (start here) · **Next:** `02_baseline_inference`

# %%
import glob, os, sys  # Setup, the same in every notebook: skip it when reading.

if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):  # on Kaggle: find and unpack the code dataset
    sys.path += glob.glob("/kaggle/input/*") + glob.glob("/kaggle/input/*/*/*")  # either layout
    import kaggle_setup  # noqa: F401
from nbutils import frameworks  # noqa: F401

# %%
from IPython.display import Image, display

from nbutils import config, data, models, plots, prompts, sequences

# %% tags=["parameters"]
MODEL = "auto"  # 'auto' (embedded 270M offline, preset on Kaggle), 'tiny', a keras-hub preset, a folder or .gguf
DATASET = "pycode-summary"  # built-in task, 'hf:<owner>/<name>', 'kaggle:<owner>/<dataset>'; the data/processed folder name
DATA_PATH = ""  # your own file: Alpaca .json/.jsonl, Dolly .jsonl, .csv/.tsv
DATA_FORMAT = ""  # force a format ('' detects it)
COLUMNS = {}  # CSV/TSV: {'instruction': <column>, 'input': <column>, 'output': <column>}
CATEGORIES = ""  # Dolly: comma-separated categories to keep
TEST_PATH = ""  # a separate file that replaces the test split
TEMPLATE = "auto"  # 'auto': Gemma's chat turns of the model's family; or a style
STOP_TOKEN = "auto"  # 'auto': <eos> for base models, end of turn for instruct; or a token
SEQUENCE_LENGTH = 256  # prompt + response tokens; longer prompts are truncated
VAL_SIZE = 0.1  # validation split: a fraction (< 1) or a row count
TEST_SIZE = 0.1  # test split: a fraction (< 1) or a row count
MAX_TRAIN = 0  # cap on training rows (0: no cap)
MAX_VAL = 0  # cap on validation rows (0: no cap)
MAX_TEST = 0  # cap on test rows (0: no cap)
MAX_SOURCE_TOKENS = 192  # built-in task: skip functions whose source is longer
SEED = 0  # seeds the split, the adapters, the data order and sampling

# %% [markdown]
# ## 1. The prompt template
# Training targets, baseline prompts, evaluation and generation all render an example the same way:
# Gemma's chat turns, with the markers of the model's family (`TEMPLATE = "auto"`; Gemma 4 writes
# `<|turn>`/`<turn|>` where Gemma 2 and 3 write `<start_of_turn>`/`<end_of_turn>`). Every training
# target ends with the **stop token**, the single token id generation stops on. With
# `STOP_TOKEN = "auto"` that is `<eos>` for base models: a base Gemma never learned the end-of-turn
# token (its embedding is one of thousands of near-identical untrained rows), so it could not learn
# to stop on it; instruction-tuned models stop on their end-of-turn token, as they were trained to.

# %%
# "auto": the embedded model offline, the keras-hub preset on Kaggle
MODEL = models.choose_model(MODEL)
tokenizer = models.load_tokenizer(MODEL)
template = prompts.Template.for_model(TEMPLATE, MODEL, STOP_TOKEN, tokenizer)
print(f"{template} for MODEL={MODEL!r}")
example = {
    "instruction": "Summarize in one sentence.",
    "input": "def add(a, b):\n    return a + b",
    "output": "Add two numbers.",
}
print(prompts.render_prompt(example, template) + example["output"] + template.stop)

# %% [markdown]
# ## 2. Load
# Structural problems (not JSON, a required field missing everywhere, an unknown format) stop here
# with one line naming the file and what to do.

# %%
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
# had its prompt truncated or was dropped. The splits and a manifest (source hash, drop counts,
# split hashes, package versions) are written atomically.

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
    # every parameter of this notebook, as run (lower-case names)
    params={name.lower(): globals()[name] for name in config.defaults("01")},
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

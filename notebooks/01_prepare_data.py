# %% [markdown]
# # 01 · Prepare the data
#
# **Purpose:** turn a data source into clean, tokenizer-checked train/val/test splits that every later
# notebook reads, rendered with **one** prompt template so training and evaluation never disagree.
#
# - **Reads:** the built-in `pycode-summary` task (mined from this Python's standard library), or your
#   own Alpaca/Dolly JSON(L) or CSV/TSV file via `DATA_PATH`.
# - **Writes:** `data/processed/<dataset>/{train,val,test}.jsonl`, `manifest.json`, `token_lengths.png`.
# - **Previous:** none (start here) · **Next:** `02_baseline_inference`

# %%
import inspect
import json

from IPython.display import Image, Markdown, display

from nbutils import data, models, prompts

# %% tags=["parameters"]
MODEL = "gemma3_270m_local"  # whose tokenizer measures lengths: "gemma3_270m_local", "tiny", a keras-hub preset…
DATASET = "pycode-summary"  # used when DATA_PATH is empty: "pycode-summary", "hf:<owner>/<name>", "kaggle:<owner>/<dataset>"
DATA_PATH = ""  # your own file: Alpaca .json/.jsonl, Dolly .jsonl, or .csv/.tsv (format detected)
DATA_FORMAT = ""  # force one of "alpaca", "dolly", "csv", "tsv"
COLUMNS = {}  # CSV/TSV only: {"instruction": "<column>", "input": "<column>", "output": "<column>"}
CATEGORIES = ""  # Dolly only: comma-separated categories to keep, e.g. "summarization,closed_qa"
TEST_PATH = ""  # optional separate test file that replaces the test split
TEMPLATE = "gemma"  # "gemma" (chat turns) or "alpaca" (### Instruction / ### Response)
STOP_TOKEN = "auto"  # "<eos>" for base models, "<end_of_turn>" for instruction-tuned ones; or name one
SEQUENCE_LENGTH = 256  # prompt + response tokens; longer rows get their prompt truncated or are dropped
VAL_SIZE = 0.1  # fraction (< 1) or row count
TEST_SIZE = 0.1
MAX_TRAIN = 0  # caps for quick CPU runs; 0 means no cap
MAX_VAL = 0
MAX_TEST = 0
MAX_SOURCE_TOKENS = 192  # built-in task: skip functions whose source is longer
SEED = 0

# %% [markdown]
# ## 1. The prompt template
# Training targets, baseline prompts, evaluation and generation all go through this one function, so
# the model is always asked the same way. Every training target ends with the **stop token**, the
# same single token id that generation stops on. With `STOP_TOKEN = "auto"` that is `<eos>` for base
# models: a base Gemma never learned `<end_of_turn>` (its embedding is one of thousands of
# near-identical untrained rows), so it could not learn to stop on it; instruction-tuned models use
# `<end_of_turn>`.

# %%
print(inspect.getsource(prompts.render_prompt))

# %% [markdown]
# ## 2. Load, validate, split and save
# `data.prepare` reads the source, drops unusable rows (counting each reason), truncates over-long
# *prompts* (never the response or its stop token), splits with a fixed seed and writes the files
# atomically. The built-in task splits **by top-level module**, so near-identical code in one module
# never lands in both train and test.

# %%
tokenizer = models.load_tokenizer(MODEL)
manifest = data.prepare(
    tokenizer, dataset=DATASET, data_path=DATA_PATH, data_format=DATA_FORMAT, columns=COLUMNS or None,
    categories=[c.strip() for c in CATEGORIES.split(",") if c.strip()] or None, test_path=TEST_PATH,
    template=TEMPLATE, sequence_length=SEQUENCE_LENGTH, val_size=VAL_SIZE, test_size=TEST_SIZE,
    max_train=MAX_TRAIN, max_val=MAX_VAL, max_test=MAX_TEST, max_source_tokens=MAX_SOURCE_TOKENS,
    seed=SEED, model=MODEL, stop_token=STOP_TOKEN,
)  # fmt: skip
template = prompts.Template.from_manifest(manifest)
out_dir = data.processed_dir(manifest["dataset"])
print(f"source: {manifest['source']['source']}  ({manifest['source']['format']}, sha256 {manifest['source']['sha256'][:12]}…)")
print(data.counts_table(manifest["drops"], manifest["rows_read"]))
print("\nrows per split:", manifest["counts"])

# %% [markdown]
# ## 3. One example, rendered and tokenized
# What the model actually sees: `<bos>` + the prompt, then the response followed by the stop token.
# Only the response tokens (and the stop token) count in the training loss.

# %%
splits, _ = data.load_processed(manifest["dataset"])
example = splits["train"][0]
prompt_ids, target_ids = prompts.encode_example(tokenizer, example, template)
display(Markdown(f"**Rendered prompt + target** (`{example['id']}`):"))
print(prompts.render_prompt(example, template) + example["output"] + template.stop)
print("prompt ids:", prompt_ids[:12], "…", prompt_ids[-6:], f"({len(prompt_ids)} tokens)")
print("target ids:", target_ids, f"(ends with the stop token {template.stop} = id {prompts.stop_token_id(tokenizer, template)})")

# %% [markdown]
# ## 4. Token lengths
# The histogram shows whether `SEQUENCE_LENGTH` fits the data: everything right of the dashed line had
# its prompt truncated or was dropped.

# %%
print(json.dumps(manifest["token_lengths"], indent=1))
display(Image(filename=str(out_dir / "token_lengths.png")))

# %% [markdown]
# ## Summary
# The checks below fail loudly if a split is missing, empty, or not what the manifest says.

# %%
for split in ("train", "val", "test"):
    rows = data.read_jsonl(out_dir / f"{split}.jsonl")
    assert len(rows) == manifest["counts"][split] > 0, split
    assert all(r["output"].strip() and "instruction" in r for r in rows), split
assert target_ids[-1] == prompts.stop_token_id(tokenizer, template)
assert (out_dir / "token_lengths.png").stat().st_size > 0
if "modules_per_split" in manifest:
    m = manifest["modules_per_split"]
    assert not (set(m["train"]) & set(m["test"])) and not (set(m["val"]) & set(m["test"]))
print(f"OK: wrote {out_dir} with {manifest['counts']}")

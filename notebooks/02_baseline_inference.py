# %% [markdown]
# # 02 · Baseline inference
#
# **Purpose:** measure the base model on the test split *before* fine-tuning, with exactly the
# prompt template and generation settings that notebook 04 will reuse for the tuned model.
#
# - **Reads:** `data/processed/<DATASET>/` (from 01).
# - **Writes:** `runs/<RUN_ID>/baseline_predictions.jsonl`, `baseline_scores.jsonl`,
# `baseline_metrics.json`.
# - **Previous:** `01_prepare_data` · **Next:** `03_lora_finetune`

# %%
import glob, os, sys  # Setup, the same in every notebook: skip it when reading.

if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):  # on Kaggle: find and unpack the code dataset
    sys.path += glob.glob("/kaggle/input/*") + glob.glob("/kaggle/input/*/*/*")  # either layout
    import kaggle_setup  # noqa: F401
from nbutils import frameworks  # noqa: F401

# %%
import json
import math

from IPython.display import Markdown, display

from nbutils import data, devices, evaluation, files, models, prompts, runs, sequences

# %% tags=["parameters"]
MODEL = "auto"  # 'auto' (embedded 270M offline, preset on Kaggle), 'tiny', a keras-hub preset, a folder or .gguf
DATASET = "pycode-summary"  # built-in task, 'hf:<owner>/<name>', 'kaggle:<owner>/<dataset>'; the data/processed folder name
RUN_ID = "manual"  # outputs go to runs/<RUN_ID>/
SEED = 0  # seeds the split, the adapters, the data order and sampling
MAX_TEST_ROWS = 0  # test rows to answer (0: the whole split)
MAX_NEW_TOKENS = 48  # answer length cap
SAMPLER = "greedy"  # 'greedy', 'beam:<beams>', 'top_k:<k>' or 'top_p:<p>' (seeded)
MIN_NEW_TOKENS = 0  # the stop token is barred for the first this many new tokens
GEN_BATCH_SIZE = 16  # prompts decoded together
MIXED_PRECISION = "auto"  # 'auto': bf16 on TPU and GPUs of compute capability 8.0+, else fp32; weights in bf16 where fp32 cannot fit

# %% [markdown]
# ## 1. Test rows and the model
# The template and sequence length come from notebook 01's manifest, so every notebook renders
# prompts the same way.

# %%
MODEL = models.choose_model(MODEL)
splits, manifest = data.load_processed(DATASET)
test_rows = splits["test"][: MAX_TEST_ROWS or None]
template, SEQUENCE_LENGTH = (
    prompts.Template.from_manifest(manifest, MODEL),
    manifest["params"]["sequence_length"],
)
out = runs.run_dir(RUN_ID)
policy = devices.use_precision(
    MIXED_PRECISION, models.preset_params(MODEL)
)  # 04 decodes in the same one
lm = models.load_gemma(MODEL, sequence_length=SEQUENCE_LENGTH, seed=SEED)
print(f"{len(test_rows)} test rows · {template} · model {MODEL} loaded in {lm.load_seconds}s")

# %% [markdown]
# ## 2. One answer with `generate`
# keras-hub renders nothing for us: we give `generate` the prompt text from the shared template,
# choose the sampler with `compile`, and stop on the template's stop token. The answer is whatever
# follows the prompt.

# %%
lm.compile(sampler=evaluation.keras_hub_generate_sampler(SAMPLER, SEED))
prompt = prompts.render_prompt(test_rows[0], template)
stop_id = sequences.stop_token_id(lm.preprocessor.tokenizer, template)
answer = lm.generate(prompt, max_length=SEQUENCE_LENGTH + MAX_NEW_TOKENS, stop_token_ids=[stop_id])
print(prompt + "⟶", answer.removeprefix(prompt)[:300])

# %% [markdown]
# ## 3. The whole test split, and the reference loss
# The same generation, batched over rows of similar length and capped at `MAX_NEW_TOKENS`. The
# same pass over each prompt also scores the reference answer that follows it, teacher-forced: the
# **response loss**, how surprised the model is by the references (lower is better; `exp(loss)` is
# the perplexity).

# %%
predictions, scores, timing = evaluation.run_inference(
    lm,
    test_rows,
    template,
    SEQUENCE_LENGTH,
    MAX_NEW_TOKENS,
    GEN_BATCH_SIZE,
    SAMPLER,
    SEED,
    min_new_tokens=MIN_NEW_TOKENS,
)
metrics = evaluation.aggregate(scores)
settings = {
    "model": MODEL,
    "dataset": DATASET,
    "template": template.style,
    "stop_token": template.stop,
    "sequence_length": SEQUENCE_LENGTH,
    "max_new_tokens": MAX_NEW_TOKENS,
    "sampler": SAMPLER,
    "min_new_tokens": MIN_NEW_TOKENS,
    "gen_batch_size": GEN_BATCH_SIZE,
    "seed": SEED,
    "policy": policy,
    "test_rows": len(test_rows),
    "split_sha256": {"test": manifest["split_sha256"]["test"]},
}
files.write_jsonl(out / "baseline_predictions.jsonl", predictions)
files.write_jsonl(out / "baseline_scores.jsonl", scores)
files.write_json(
    out / "baseline_metrics.json", {"settings": settings, "metrics": metrics, "timing": timing}
)
print(json.dumps(metrics, indent=1), timing)

# %% [markdown]
# ## 4. A few examples
# Read them: numbers alone hide whether the model answers the question at all.

# %%
table = "| reference | baseline prediction | stopped |\n|---|---|---|\n"
for p in predictions[:5]:
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:160]
    table += f"| {cell(p['reference'])} | {cell(p['prediction'])} | {p['stopped']} |\n"
display(Markdown(table))

# %% [markdown]
# ## Summary
# Checks that can fail: every test row answered, answers that did not stop ran to the cap, most
# answers are non-empty text, and the base model is far better than chance on the references
# (a broken weight port or a wrong loss mask would show up here; the tiny test models are random).

# %%
saved = files.read_jsonl(out / "baseline_predictions.jsonl")
assert [p["id"] for p in saved] == [r["id"] for r in test_rows] and saved
assert all(p["stopped"] or p["n_tokens"] == MAX_NEW_TOKENS for p in saved)
assert sum(bool(p["prediction"].strip()) for p in saved) >= 0.5 * len(saved), (
    "most answers are empty"
)
chance = math.log(lm.backbone.vocabulary_size)  # the loss of a model that knows nothing
assert math.isfinite(metrics["response_loss"]) and (
    MODEL in models.TINY_MODELS or metrics["response_loss"] < chance / 2
)
print(
    f"OK: baseline ROUGE-L {metrics['rougeL_f1']:.3f}, stop rate {metrics['stop_rate']:.0%}, written to {out}"
)

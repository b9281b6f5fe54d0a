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
import json
import math

from IPython.display import Markdown, display

from nbutils import data, evaluation, files, models, prompts, runs, sequences

# %% tags=["parameters"]
# embedded 270M offline / keras-hub preset on Kaggle; or "gemma3_270m_local", "tiny", "gemma3_1b", …
MODEL = "auto"
DATASET = "pycode-summary"  # folder name under data/processed written by notebook 01
RUN_ID = "manual"  # outputs go to runs/<RUN_ID>/
MAX_TEST_ROWS = 0  # 0 means the whole test split
MAX_NEW_TOKENS = 48  # answer length cap; the base model rarely stops on its own
SAMPLER = "greedy"  # or "top_k:50" / "top_p:0.9" (seeded)
GEN_BATCH_SIZE = 16
SEED = 0

# %% [markdown]
# ## 1. Test rows and the model
# The template and sequence length come from notebook 01's manifest, so every notebook renders
# prompts the same way.

# %%
splits, manifest = data.load_processed(DATASET)
test_rows = splits["test"][: MAX_TEST_ROWS or None]
template, SEQUENCE_LENGTH = (
    prompts.Template.from_manifest(manifest),
    manifest["params"]["sequence_length"],
)
out = runs.run_dir(RUN_ID)
MODEL = models.choose_model(MODEL)
lm = models.load_gemma(MODEL, sequence_length=SEQUENCE_LENGTH, seed=SEED)
print(f"{len(test_rows)} test rows · {template} · model {MODEL} loaded in {lm.load_seconds}s")

# %% [markdown]
# ## 2. One answer with `generate`
# keras-hub renders nothing for us: we give `generate` the prompt text from the shared template,
# choose the sampler with `compile`, and stop on the template's stop token. The answer is whatever
# follows the prompt.

# %%
lm.compile(sampler=evaluation.make_sampler(SAMPLER, SEED))
prompt = prompts.render_prompt(test_rows[0], template)
stop_id = sequences.stop_token_id(lm.preprocessor.tokenizer, template)
answer = lm.generate(prompt, max_length=SEQUENCE_LENGTH + MAX_NEW_TOKENS, stop_token_ids=[stop_id])
print(prompt + "⟶", answer.removeprefix(prompt)[:300])

# %% [markdown]
# ## 3. The whole test split, and the reference loss
# The same generation, batched over rows of similar length and capped at `MAX_NEW_TOKENS`. We also
# compute the teacher-forced **response loss**: how surprised the model is by the reference answers
# (lower is better; `exp(loss)` is the perplexity).

# %%
predictions, scores, timing = evaluation.run_inference(
    lm, test_rows, template, SEQUENCE_LENGTH, MAX_NEW_TOKENS, GEN_BATCH_SIZE, SAMPLER, SEED
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
    "gen_batch_size": GEN_BATCH_SIZE,
    "seed": SEED,
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
# (a broken weight port or a wrong loss mask would show up here; the `tiny` test model is random).

# %%
saved = files.read_jsonl(out / "baseline_predictions.jsonl")
assert [p["id"] for p in saved] == [r["id"] for r in test_rows] and saved
assert all(p["stopped"] or p["n_tokens"] == MAX_NEW_TOKENS for p in saved)
assert sum(bool(p["prediction"].strip()) for p in saved) >= 0.5 * len(saved), (
    "most answers are empty"
)
chance = math.log(lm.backbone.vocabulary_size)  # the loss of a model that knows nothing
assert math.isfinite(metrics["response_loss"]) and (
    MODEL == "tiny" or metrics["response_loss"] < chance / 2
)
print(
    f"OK: baseline ROUGE-L {metrics['rougeL_f1']:.3f}, stop rate {metrics['stop_rate']:.0%}, written to {out}"
)

# %% [markdown]
# # 04 · Evaluate: baseline vs LoRA
#
# **Purpose:** load the base model plus the adapter, answer the same test rows with the same
# settings as notebook 02, and compare honestly: per-metric differences with paired bootstrap 95%
# confidence intervals, a chart, and examples side by side.
#
# - **Reads:** `data/processed/<DATASET>/`, `runs/<RUN_ID>/baseline_*` (02) and `adapter.*` (03).
# - **Writes:** `runs/<RUN_ID>/tuned_predictions.jsonl`, `metrics.json`, `metrics.png`, `report.md`,
#   `own_prompts.jsonl` (your `PROMPTS`, answered by both models).
# - **Previous:** `03_lora_finetune` · **Next:** `06_export` (`05_experiments` compares LoRA
# configurations)

# %%
import glob, os, sys  # Setup, the same in every notebook: skip it when reading.

if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):  # on Kaggle: find and unpack the code dataset
    sys.path += glob.glob("/kaggle/input/*") + glob.glob("/kaggle/input/*/*/*")  # either layout
    import kaggle_setup  # noqa: F401
from nbutils import frameworks  # noqa: F401

# %%
from IPython.display import Image, Markdown, display

from nbutils import data, devices, evaluation, files, models, plots, prompts, report, runs, training

# %% tags=["parameters"]
MODEL = "auto"  # 'auto' (embedded 270M offline, preset on Kaggle), 'tiny', a keras-hub preset, a folder or .gguf
DATASET = "pycode-summary"  # built-in task, 'hf:<owner>/<name>', 'kaggle:<owner>/<dataset>'; the data/processed folder name
RUN_ID = "manual"  # outputs go to runs/<RUN_ID>/
SEED = 0  # seeds the split, the adapters, the data order and sampling
MIXED_PRECISION = "auto"  # 'auto': bf16 on TPU and GPUs of compute capability 8.0+, else fp32; weights in bf16 where fp32 cannot fit
N_BOOTSTRAP = 1000  # paired bootstrap resamples
PROMPTS = ["What does this do? def area(r): return 3.14 * r * r"]  # prompts to try, base vs tuned

# %% [markdown]
# ## 1. Base model + adapter, with 02's settings
# The generation settings are read from notebook 02's output, not repeated here, so both sides are
# generated identically; the split hashes recorded by 02 and 03 must match the data on disk.

# %%
MODEL = models.choose_model(MODEL)
baseline = runs.read_step_output(RUN_ID, "02_baseline_inference")
settings = baseline["settings"]
if settings["model"] != MODEL:
    raise ValueError(
        f"RUN_ID={RUN_ID!r} has a baseline for model={settings['model']!r}, not {MODEL!r}; rerun 02."
    )
splits, manifest = data.load_processed(DATASET)
out = runs.run_dir(RUN_ID)
spec = runs.read_step_output(RUN_ID, "03_lora_finetune")
data.check_split_hashes(settings["split_sha256"], manifest, "notebook 02 (baseline)")
data.check_split_hashes(spec["split_sha256"], manifest, "notebook 03 (training)")
if (spec["template"], spec["stop_token"]) != (settings["template"], settings["stop_token"]):
    raise ValueError(
        f"the adapter was trained with template {spec['template']!r}/{spec['stop_token']!r} but the baseline "
        f"used {settings['template']!r}/{settings['stop_token']!r}; re-run 02 and 03 on the same data."
    )
if devices.use_precision(MIXED_PRECISION, models.preset_params(MODEL)) != settings["policy"]:
    raise ValueError(
        f"MIXED_PRECISION={MIXED_PRECISION!r}: 02 decoded in {settings['policy']}; use its setting."
    )
test_rows = splits["test"][: settings["test_rows"]]
lm = models.load_gemma(MODEL, sequence_length=settings["sequence_length"], seed=SEED)
spec = training.load_adapter(lm, out / "adapter.lora.h5", MODEL)
print(f"adapter: rank {spec['rank']}, targets {spec['targets']}, alpha {spec['alpha']}")

# %% [markdown]
# ## 2. Tuned predictions and scores

# %%
template = prompts.Template(settings["template"], settings["stop_token"])
predictions, scores, timing = evaluation.run_inference(
    lm,
    test_rows,
    template,
    settings["sequence_length"],
    settings["max_new_tokens"],
    settings["gen_batch_size"],
    settings["sampler"],
    settings["seed"],
    min_new_tokens=settings.get("min_new_tokens", 0),
)
files.write_jsonl(out / "tuned_predictions.jsonl", predictions)
files.write_jsonl(out / "tuned_scores.jsonl", scores)
print(f"answers and reference losses in {timing['generate_s']} s")

# %% [markdown]
# ## 3. Baseline vs tuned
# Each difference comes with a **paired bootstrap** 95% CI: we resample the test set (the same draw
# for both models) and recompute the metrics. Rows of the built-in task come in modules (the split
# keeps each module whole), and rows of one module resemble each other, so we resample **whole
# modules** (a cluster bootstrap); resampling rows as if independent gives intervals that are too
# narrow (both are in `metrics.json`). An interval entirely above 0 means the gain is not luck of
# the draw of test data.

# %%
base_scores = files.read_jsonl(out / "baseline_scores.jsonl")
groups = data.bootstrap_groups(test_rows)
comparison = evaluation.paired_bootstrap(base_scores, scores, N_BOOTSTRAP, SEED, groups)
print(next(iter(comparison.values()))["ci_method"])
display(Markdown(report.comparison_table(comparison)))
plots.metric_bars(comparison, out / "metrics.png")
display(Image(filename=str(out / "metrics.png")))

# %% [markdown]
# ## 4. Examples side by side

# %%
base_predictions = files.read_jsonl(out / "baseline_predictions.jsonl")
examples = report.examples_table(test_rows, base_predictions, predictions, n=8)
display(Markdown(examples))

# %% [markdown]
# ## 5. Report
# `metrics.json` holds every number above; `report.md` is the same story in one readable file.

# %%
metrics = {
    "settings": settings,
    "adapter": spec,
    "comparison": comparison,
    "timing": timing,
    "n_test_rows": len(test_rows),
}
files.write_json(out / "metrics.json", metrics)
report_path = report.write_report(out, metrics, examples)
print(f"report: {report_path}")

# %% [markdown]
# ## 6. Try it: your own prompts
# The adapter at work on your words, not only on the test split: each of `PROMPTS` is answered
# under the run's template and 02's decoding settings by the base model (every LoRA `B` zeroed for
# the call, which is exactly the base model) and by the tuned one.

# %%
own = [{"id": str(i), "instruction": p, "input": "", "output": ""} for i, p in enumerate(PROMPTS)]
decode = [settings[k] for k in ("max_new_tokens", "gen_batch_size", "sampler", "seed")]
least = {"min_new_tokens": settings.get("min_new_tokens", 0), "progress": False}
tuned_own = evaluation.generate(lm, own, template, *decode, **least)
with training.adapter_off(lm):
    base_own = evaluation.generate(lm, own, template, *decode, **least)
files.write_jsonl(
    out / "own_prompts.jsonl",
    [
        {"prompt": p, "base": b["prediction"], "tuned": t["prediction"]}
        for p, b, t in zip(PROMPTS, base_own, tuned_own)
    ],
)
display(Markdown(report.own_prompts_table(base_own, tuned_own)))

# %% [markdown]
# ## Summary
# Every metric is there, both sides answered the same rows, and the tuned model fits the references
# better than the base model (lower response loss).

# %%
saved = files.read_json(out / "metrics.json")["comparison"]
assert set(saved) >= {
    "rougeL_f1",
    "chrf",
    "exact_match",
    "response_loss",
    "stop_rate",
    "mean_tokens",
}
assert [p["id"] for p in predictions] == [p["id"] for p in base_predictions]
assert len(files.read_jsonl(out / "own_prompts.jsonl")) == len(PROMPTS)
# The adapter was trained on these targets' distribution: a missing adapter, a wrong alpha or a
# broken loss mask shows up as no gain in the reference loss (the random `tiny` test model is
# exempt).
assert MODEL in models.TINY_MODELS or saved["response_loss"]["diff"] < 0, (
    "the tuned model is no better on the references"
)
assert report_path.read_text().startswith("# ")
gain = saved["rougeL_f1"]
print(
    f"OK: ROUGE-L {gain['baseline']:.3f} -> {gain['tuned']:.3f} (diff {gain['diff']:+.3f}, 95% CI {gain['ci95'][0]:+.3f}..{gain['ci95'][1]:+.3f})"
)

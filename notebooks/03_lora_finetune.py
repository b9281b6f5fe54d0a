# %% [markdown]
# # 03 · LoRA fine-tuning
#
# **Purpose:** adapt Gemma to the task by training small low-rank adapters while every original
# weight stays frozen, and save just the adapter (a few MB instead of the whole model).
#
# - **Reads:** `data/processed/<DATASET>/` (from 01).
# - **Writes:** `runs/<RUN_ID>/adapter.lora.h5`, `adapter.json`, `train_log.csv`, `loss_curve.png`, `train_summary.json`.
# - **Previous:** `02_baseline_inference` · **Next:** `04_evaluate`

# %%
import csv
import inspect
import json

from IPython.display import Image, display

from nbutils import data, models, plots, prompts, runs, training

# %% tags=["parameters"]
MODEL = "gemma3_270m_local"
DATASET = "pycode-summary"
RUN_ID = "manual"
RANK = 8  # LoRA rank r: adapter matrices are (d x r) and (r x k)
LORA_TARGETS = "query,value"  # keras-hub's default; or "attention", "all", or a list like "query,key,value,output,gate,up,down"
LORA_ALPHA = 0  # scale is alpha / rank; 0 means alpha = rank
LEARNING_RATE = 2e-4
WEIGHT_DECAY = 0.01
WARMUP_STEPS = 10
SCHEDULE = "cosine"  # or "linear"
CLIPNORM = 1.0
BATCH_SIZE = 4
GRAD_ACCUM = 1  # optimizer update every GRAD_ACCUM batches
EPOCHS = 1
MAX_STEPS = 0  # optimizer updates; 0 means EPOCHS passes over the train split
EVAL_EVERY = 25  # validation loss every this many updates
PATIENCE = 3  # early stopping: evaluations without improvement before stopping (best adapter restored)
MAX_VAL_ROWS = 0  # 0 means the whole val split
MIXED_PRECISION = "auto"  # bf16 on GPU/TPU, fp32 on CPU; or "on" / "off"
SEED = 0

# %% [markdown]
# ## 1. Model and adapters
# LoRA replaces a frozen weight `W` by `W + (alpha / r) · A·B` with small trainable `A` and `B`.
# keras-hub's `backbone.enable_lora` adds them to the named layers; our helper also sets `alpha`,
# which keras-hub does not expose (Keras' own layers accept it):

# %%
print(inspect.getsource(training.enable_lora))

# %%
policy = training.mixed_precision(MIXED_PRECISION)  # must be set before the model is built
splits, manifest = data.load_processed(DATASET)
template, SEQUENCE_LENGTH = prompts.Template.from_manifest(manifest), manifest["params"]["sequence_length"]
out = runs.run_dir(RUN_ID)
lm = models.load_gemma(MODEL, sequence_length=SEQUENCE_LENGTH, seed=SEED)
summary = training.enable_lora(lm, RANK, LORA_TARGETS, LORA_ALPHA, SEED)
print(f"dtype policy {policy}")
print(f"parameters: {summary['total_params']:,} total, {summary['trainable_params']:,} trainable "
      f"({summary['trainable_share_pct']:.3f}%), adapter {summary['adapter_mb']:.2f} MB")

# %% [markdown]
# ## 2. Train
# Only response tokens count in the loss (the prompt and padding are masked), and the loss is shown
# **per response token**. AdamW with warmup and decay, gradient clipping, validation every
# `EVAL_EVERY` updates and early stopping that restores the best adapter.

# %%
cfg = training.TrainConfig(
    rank=RANK, targets=LORA_TARGETS, alpha=LORA_ALPHA, learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
    warmup_steps=WARMUP_STEPS, schedule=SCHEDULE, clipnorm=CLIPNORM, batch_size=BATCH_SIZE, grad_accum=GRAD_ACCUM,
    epochs=EPOCHS, max_steps=MAX_STEPS, eval_every=EVAL_EVERY, patience=PATIENCE, seed=SEED,
)  # fmt: skip
result = training.train_lora(lm, splits["train"], splits["val"][: MAX_VAL_ROWS or None], cfg, template, SEQUENCE_LENGTH, out)
print(f"trained {result['batches_run']} batches in {result['train_seconds']} s; best val loss {result['best_val_loss']:.3f}")

# %% [markdown]
# ## 3. Loss curve
# Training loss should fall quickly from the base model's level; the validation points show whether
# the adapter generalises or starts to overfit.

# %%
plots.loss_curve(out / "train_log.csv", out / "loss_curve.png")
display(Image(filename=str(out / "loss_curve.png")))

# %% [markdown]
# ## 4. Save the adapter
# Only the LoRA matrices go into `adapter.lora.h5`; `adapter.json` records what is needed to rebuild
# it on top of the same base model.

# %%
spec = training.adapter_spec(cfg, MODEL, template, SEQUENCE_LENGTH, manifest["split_sha256"]["train"])
adapter_path, spec_path = training.save_adapter(lm, out / "adapter.lora.h5", spec)
runs.write_json(out / "train_summary.json", {"params": summary, "policy": policy, **result})
print(json.dumps(spec, indent=1)[:600])

# %% [markdown]
# ## Summary

# %%
log = list(csv.DictReader(open(out / "train_log.csv")))
assert len(log) == result["batches_run"] > 0 and any(r["val_loss"] for r in log)
assert adapter_path.stat().st_size > 0 and json.loads(spec_path.read_text())["rank"] == RANK
assert 0 < summary["trainable_share_pct"] < 5
print(f"OK: adapter {adapter_path} ({adapter_path.stat().st_size / 1e6:.2f} MB)")

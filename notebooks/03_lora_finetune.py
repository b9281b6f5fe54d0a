# %% [markdown]
# # 03 · LoRA fine-tuning
#
# **Purpose:** adapt Gemma to the task by training small low-rank adapters while every original
# weight stays frozen, and save just the adapter (a few MB instead of the whole model).
#
# - **Reads:** `data/processed/<DATASET>/` (from 01).
# - **Writes:** `runs/<RUN_ID>/adapter.lora.h5`, `adapter.json`, `probe.npz`, `train_log.csv`,
# `loss_curve.png`,
#   `train_summary.json`, `checkpoints/` (while training).
# - **Previous:** `02_baseline_inference` · **Next:** `04_evaluate`

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
import csv
import inspect
import json

import keras
from IPython.display import Image, display

from nbutils import (
    batches,
    data,
    devices,
    export,
    files,
    models,
    objective,
    plots,
    prompts,
    runs,
    training,
)

# %% tags=["parameters"]
MODEL = "auto"  # embedded 270M offline / keras-hub preset on Kaggle; or any name 02 accepts
DATASET = "pycode-summary"
RUN_ID = "manual"
RANK = 8  # LoRA rank r: adapter matrices are (d x r) and (r x k)
# keras-hub's default; or "attention", "all", or a list like "query,key,value,output,gate,up,down"
LORA_TARGETS = "query,value"
LORA_ALPHA = 0  # the update is scaled by alpha / rank; 0 means alpha equal to the rank
LEARNING_RATE = 2e-4
WEIGHT_DECAY = 0.01
WARMUP_STEPS = 10
SCHEDULE = "cosine"  # or "linear"
CLIPNORM = 1.0  # clip the global norm of all adapter gradients; 0 turns it off
BATCH_SIZE = 4
GRAD_ACCUM = 1  # batches per optimizer update (the loss is the mean over all their response tokens)
# a batch with more tokens (rows x width) runs as smaller steps of the same update: less memory; 0:
# whole
MAX_BATCH_TOKENS = 0
EPOCHS = 1
MAX_STEPS = 0  # optimizer updates; 0 means EPOCHS passes over the train split
EVAL_EVERY = 25  # validation loss every this many updates
# early stopping: evaluations without improvement before stopping (the best adapter is kept)
PATIENCE = 3
# updates between checkpoints (adapter, optimizer, progress) in runs/<RUN_ID>/checkpoints; 0: none
CHECKPOINT_EVERY = 50
KEEP_CHECKPOINTS = 2  # the newest ones kept
RESUME = False  # True: continue from the latest checkpoint of RUN_ID (same parameters)
MAX_VAL_ROWS = 0  # 0 means the whole val split
MIXED_PRECISION = "auto"  # bf16 on GPU/TPU, fp32 on CPU; or "on" / "off"
# "auto" (data parallel over all local devices when there are several), "none", "data", "model:2x4"
DISTRIBUTION = "auto"
# True: stop at once when JAX sees only the CPU (the Kaggle profiles set it)
REQUIRE_ACCELERATOR = False
SEED = 0

# %% [markdown]
# ## 1. Model and adapters
# LoRA replaces a frozen weight `W` by `W + (alpha / r) · A·B` with small trainable `A` (random) and
# `B` (zeros, so training starts from the base model). keras-hub's `enable_lora` freezes the
# backbone
# and adds `A` and `B` to the named layers; it has no `alpha` argument, so `configure_lora` sets it
# on
# each LoRA layer (and draws `A` from `SEED`).

# %%
MODEL = models.choose_model(MODEL)
devices.require_accelerator(REQUIRE_ACCELERATOR)
policy = training.mixed_precision(MIXED_PRECISION)  # must be set before the model is built
# so is the device mesh its weights are laid out on
distribution = devices.use_distribution(DISTRIBUTION)
splits, manifest = data.load_processed(DATASET)
template, SEQUENCE_LENGTH = (
    prompts.Template.from_manifest(manifest),
    manifest["params"]["sequence_length"],
)
out = runs.run_dir(RUN_ID)
lm = models.load_gemma(MODEL, sequence_length=SEQUENCE_LENGTH, seed=SEED)

lm.backbone.enable_lora(rank=RANK, target_layer_names=training.lora_layer_names(LORA_TARGETS))
lora_layers = training.configure_lora(lm.backbone, alpha=LORA_ALPHA or RANK, seed=SEED)

summary = training.parameter_summary(lm)
print(
    f"dtype policy {policy}; LoRA on {len(lora_layers)} layers ({', '.join(sorted({l.name for l in lora_layers}))})"
)
print(
    f"parameters: {summary['total_params']:,} total, {summary['trainable_params']:,} trainable "
    f"({summary['trainable_share_pct']:.3f}%), adapter {summary['adapter_mb']:.2f} MB"
)

# %% [markdown]
# ## 2. Optimizer and loss
# AdamW with linear warmup then cosine (or linear) decay, clipping on the global norm of all adapter
# gradients; biases and norm scales are not decayed. The loss is cross-entropy **at the response
# positions only** (prompt and padding are never scored, and the 262k-word output layer runs only
# there), summed over the response tokens and divided by their count in the whole update:

# %%
cfg = training.TrainConfig(
    rank=RANK,
    targets=LORA_TARGETS,
    alpha=LORA_ALPHA,
    learning_rate=LEARNING_RATE,
    weight_decay=WEIGHT_DECAY,
    warmup_steps=WARMUP_STEPS,
    schedule=SCHEDULE,
    clipnorm=CLIPNORM,
    batch_size=BATCH_SIZE,
    grad_accum=GRAD_ACCUM,
    epochs=EPOCHS,
    max_steps=MAX_STEPS,
    eval_every=EVAL_EVERY,
    patience=PATIENCE,
    seed=SEED,
    checkpoint_every=CHECKPOINT_EVERY,
    keep_checkpoints=KEEP_CHECKPOINTS,
    max_batch_tokens=MAX_BATCH_TOKENS,
)
plan = training.plan(cfg, len(splits["train"]))
optimizer = keras.optimizers.AdamW(
    learning_rate=training.lr_schedule(cfg, plan["updates"]),
    weight_decay=WEIGHT_DECAY,
    global_clipnorm=CLIPNORM or None,
)
optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
print(inspect.getsource(objective.scored_nll))
print(
    f"{plan['updates']} updates of {BATCH_SIZE} x {GRAD_ACCUM} rows; validation every {EVAL_EVERY} updates"
)
lengths = manifest["token_lengths"]
step_rows, step_width = batches.largest_step(BATCH_SIZE, lengths["total"]["max"], MAX_BATCH_TOKENS)
print(
    devices.memory_table(
        devices.memory_estimate(lm, step_rows, step_width, lengths["target"]["max"])
    )
)

# %% [markdown]
# ## 3. Train
# Rows are batched by length (a batch is only as wide as its longest row), each step is compiled
# once per batch shape (a batch over `MAX_BATCH_TOKENS` runs as smaller steps of the same update, to
# save memory), validation loss is computed every `EVAL_EVERY` updates, and early stopping
# keeps the best adapter. Every update is logged to `train_log.csv` (loss, learning rate, tokens/s).
# A checkpoint every `CHECKPOINT_EVERY` updates (and on SIGTERM or Ctrl-C) lets `RESUME=True`
# continue
# a run that died, to the same result as if it never had.

# %%
result = training.train_lora(
    lm,
    optimizer,
    splits["train"],
    splits["val"][: MAX_VAL_ROWS or None],
    cfg,
    template,
    SEQUENCE_LENGTH,
    out,
    resume=RESUME,
)
print(
    f"{result['updates_run']} updates in {result['train_seconds']} s ({result['useful_tokens_per_s']} response tokens/s, "
    f"{result['compilations']} compiled shapes); best val loss {result['best_val_loss']:.3f}"
)

# %% [markdown]
# ## 4. Loss curve
# Training loss should fall quickly from the base model's level; the validation points show whether
# the adapter generalises or starts to overfit.

# %%
plots.loss_curve(out / "train_log.csv", out / "loss_curve.png")
display(Image(filename=str(out / "loss_curve.png")))

# %% [markdown]
# ## 5. Save the adapter
# Only the LoRA matrices go into `adapter.lora.h5`; `adapter.json` records what is needed to rebuild
# it on top of the same base model. `probe.npz` keeps what this model computes on two validation
# rows,
# so notebook 06 can prove that the adapter file and every export rebuild exactly this model.

# %%
spec = training.adapter_spec(cfg, MODEL, template, SEQUENCE_LENGTH, manifest["split_sha256"])
adapter_path, spec_path = training.save_adapter(lm, out / "adapter.lora.h5", spec)
probe = export.probe_inputs(
    lm.preprocessor.tokenizer, splits["val"][: export.PROBE_ROWS], template, SEQUENCE_LENGTH
)
export.save_probe(lm, probe, out / export.PROBE_FILE)
files.write_json(out / "train_summary.json", {"params": summary, "policy": policy, **result})
print(json.dumps(spec, indent=1)[:600])

# %% [markdown]
# ## Summary
# The log has a row per batch and validation points; the adapter is not the untrained one (every `B`
# matrix starts at zero, so an adapter whose `B`s are still all zero learned nothing).

# %%
with open(out / "train_log.csv", newline="") as f:
    log = list(csv.DictReader(f))
assert len(log) == result["updates_run"] > 0 and any(r["val_loss"] for r in log)
assert files.read_json(spec_path)["rank"] == RANK and adapter_path.stat().st_size > 0
assert all(
    float(abs(keras.ops.convert_to_numpy(l.lora_kernel_b)).max()) > 0 for l in lora_layers
), "an adapter B is all zero"
assert 0 < summary["trainable_share_pct"] < 5
print(f"OK: adapter {adapter_path} ({adapter_path.stat().st_size / 1e6:.2f} MB)")

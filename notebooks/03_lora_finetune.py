# %% [markdown]
# # 03 · LoRA fine-tuning
#
# **Purpose:** adapt Gemma to the task by training small low-rank adapters while every original
# weight stays frozen, and save just the adapter (a few MB instead of the whole model).
#
# - **Reads:** `data/processed/<DATASET>/` (from 01).
# - **Writes:** `runs/<RUN_ID>/adapter.lora.h5`, `adapter.json`, `probe.npz`, `train_log.csv`,
#   `loss_curve.png`, `train_summary.json`, `checkpoints/` (while training).
# - **Previous:** `02_baseline_inference` · **Next:** `04_evaluate`

# %%
import glob, os, sys  # Setup, the same in every notebook: skip it when reading.

if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):  # on Kaggle: find and unpack the code dataset
    sys.path += glob.glob("/kaggle/input/*") + glob.glob("/kaggle/input/*/*/*")  # either layout
    import kaggle_setup  # noqa: F401
from nbutils import frameworks  # noqa: F401

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
MODEL = "auto"  # 'auto' (embedded 270M offline, preset on Kaggle), 'tiny', a keras-hub preset, a folder or .gguf
DATASET = "pycode-summary"  # built-in task, 'hf:<owner>/<name>', 'kaggle:<owner>/<dataset>'; the data/processed folder name
RUN_ID = "manual"  # outputs go to runs/<RUN_ID>/
SEED = 0  # seeds the split, the adapters, the data order and sampling
RANK = 8  # LoRA rank r: adapters are (d x r) and (r x k)
LORA_TARGETS = "query,value"  # 'query,value', 'attention', 'all', or a list of query,key,value,output,gate,up,down
LORA_ALPHA = 0.0  # the update is scaled by alpha / rank; 0 means alpha equal to the rank
LORA_SCALING = "standard"  # 'standard': alpha / r; 'rslora': alpha / sqrt(r) (rank-stabilised)
LORAPLUS_RATIO = 1.0  # LoRA+: B's learning rate over A's (1: plain LoRA)
DORA = False  # DoRA: a trained magnitude per output unit times the normalised W + s·A·B
NEFTUNE_ALPHA = 0.0  # NEFTune: noise alpha / sqrt(L·d) on the embeddings while training (0: off)
LEARNING_RATE = 0.0002  # AdamW peak learning rate, in (0, 1)
WEIGHT_DECAY = 0.01  # AdamW decoupled weight decay (not on biases and norm scales)
WARMUP_STEPS = 10  # linear warmup updates
SCHEDULE = "cosine"  # decay after warmup
CLIPNORM = 1.0  # clip the global norm of all adapter gradients (0: off)
BATCH_SIZE = 4  # rows per batch
GRAD_ACCUM = 1  # batches per optimizer update
MAX_BATCH_TOKENS = 0  # run a batch over this many tokens as smaller steps of one update (0: whole)
EPOCHS = 1.0  # passes over the train split (when MAX_STEPS is 0)
MAX_STEPS = 0  # optimizer updates (0: EPOCHS passes); 05: per configuration
EVAL_EVERY = 25  # validation loss every this many updates
PATIENCE = 3  # early stopping: evaluations without improvement
MIN_DELTA = 0.0  # early stopping: a fall of the validation loss by less is no improvement
CHECKPOINT_EVERY = 50  # updates between checkpoints (0: none)
KEEP_CHECKPOINTS = 2  # newest checkpoints kept
RESUME = False  # continue from RUN_ID's latest checkpoint
RESUME_FROM = ""  # latest checkpoint of a folder or attached kernel <owner>/<kernel>
MAX_VAL_ROWS = 0  # validation rows used (0: the whole split)
MIXED_PRECISION = "auto"  # 'auto': bf16 on TPU and GPUs of compute capability 8.0+, else fp32; weights in bf16 where fp32 cannot fit
DISTRIBUTION = "auto"  # 'auto', 'none', 'data' or 'model:<data>x<model>'
REQUIRE_ACCELERATOR = False  # stop at once when JAX sees only the CPU

# %% [markdown]
# ## 1. Model and adapters
# LoRA replaces a frozen weight `W` by `W + (alpha / r) · A·B` with small trainable `A` (random) and
# `B` (zeros, so training starts from the base model). keras-hub's `enable_lora` freezes the
# backbone and adds `A` and `B` to the named layers; it has no `alpha` argument, so `configure_lora`
# sets it on each LoRA layer (and draws `A` from `SEED`). It also offers what Keras lacks:
# `LORA_SCALING="rslora"` scales by `alpha / sqrt(r)`, and `DORA=True` trains a magnitude per output
# unit times the normalised `W + s·A·B` (DoRA; it starts equal to the base model too).

# %%
MODEL = models.choose_model(MODEL)
devices.require_accelerator(REQUIRE_ACCELERATOR)
# the device mesh the weights are laid out on, and their dtype: set before the model is built
distribution = devices.use_distribution(DISTRIBUTION)
policy = devices.use_precision(MIXED_PRECISION, models.preset_params(MODEL))
splits, manifest = data.load_processed(DATASET)
template, SEQUENCE_LENGTH = (
    prompts.Template.from_manifest(manifest, MODEL),
    manifest["params"]["sequence_length"],
)
out = runs.run_dir(RUN_ID)
lm = models.load_gemma(MODEL, sequence_length=SEQUENCE_LENGTH, seed=SEED)

lm.backbone.enable_lora(rank=RANK, target_layer_names=training.lora_layer_names(LORA_TARGETS))
lora_layers = training.configure_lora(
    lm.backbone, alpha=LORA_ALPHA or RANK, seed=SEED, scaling=LORA_SCALING, dora=DORA
)

summary = training.parameter_summary(lm)
scale = lora_layers[0].lora_alpha / RANK
print(f"LoRA on {len(lora_layers)} layers ({', '.join(sorted({l.name for l in lora_layers}))})")
print(f"update scale {scale:g} ({LORA_SCALING}){', DoRA' if DORA else ''}")
print(
    f"parameters: {summary['total_params']:,} total, {summary['trainable_params']:,} trainable "
    f"({summary['trainable_share_pct']:.3f}%), adapter {summary['adapter_mb']:.2f} MB"
)

# %% [markdown]
# ## 2. Optimizer and loss
# AdamW with linear warmup then cosine (or linear) decay, clipping on the global norm of all adapter
# gradients; biases and norm scales are not decayed. `LORAPLUS_RATIO` (LoRA+) multiplies every
# `B`'s step, and `NEFTUNE_ALPHA` adds noise to the embeddings while training (never when
# evaluating); both act inside `train_lora`. The loss is cross-entropy **at the response
# positions only** (prompt and padding are never scored, and the 262k-word output layer runs only
# there), summed over the response tokens and divided by their count in the whole update:

# %%
cfg = training.TrainConfig.from_parameters(globals())  # RANK, LEARNING_RATE, ... as set above
plan = training.plan(cfg, len(splits["train"]))
optimizer = training.adamw(cfg, plan["updates"])
print(inspect.getsource(training.adamw))
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
# save memory), validation loss is computed every `EVAL_EVERY` updates, and early stopping keeps the
# best adapter (it stops after `PATIENCE` evaluations that did not lower the loss by more than
# `MIN_DELTA`). Every update is logged to `train_log.csv` (loss, learning rate, tokens/s). A
# checkpoint every `CHECKPOINT_EVERY` updates (and on SIGTERM or Ctrl-C) lets `RESUME=True` continue
# a run that died, to the same result as if it never had; `RESUME_FROM` continues from another
# folder's, such as an earlier Kaggle session's output.

# %%
if RESUME_FROM:  # e.g. this kernel's earlier version, attached as an input
    training.import_checkpoint(RESUME_FROM, RUN_ID, out)
result = training.train_lora(
    lm,
    optimizer,
    splits["train"],
    splits["val"][: MAX_VAL_ROWS or None],
    cfg,
    template,
    SEQUENCE_LENGTH,
    out,
    resume=RESUME or bool(RESUME_FROM),
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
# rows, so notebook 06 can prove that the adapter file and every export rebuild exactly this model.

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

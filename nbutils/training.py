"""LoRA fine-tuning behind one function, :func:`train_lora` (notebook 03).

Data in (rows rendered with the shared template), adapter and history out. The loss counts only
response tokens (prompt and padding masked) and is reported per response token: each batch's
sample weights are scaled so that Keras' ``sum_over_batch_size`` reduction equals the mean over the
batch's response tokens. A faster path can replace :func:`fit_adapter` without touching notebooks.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from pathlib import Path

import numpy as np

from nbutils import compat, files, prompts, sequences

# Our target names -> layer names inside keras-hub's Gemma decoder blocks.
LORA_TARGETS = {"query": "query", "key": "key", "value": "value", "output": "attention_output",
                "gate": "ffw_gating", "up": "ffw_gating_2", "down": "ffw_linear"}  # fmt: skip
LOG_COLUMNS = ["step", "train_loss", "val_loss", "learning_rate", "tokens_per_s"]
TARGET_GROUPS = {"attention": "query,key,value,output", "all": ",".join(LORA_TARGETS)}


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a fine-tuning run (the notebook's parameters)."""

    rank: int = 8
    targets: str = "query,value"
    alpha: float = 0.0  # 0 means alpha = rank (scale 1)
    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 10
    schedule: str = "cosine"  # or "linear"
    clipnorm: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int = 0  # optimizer updates; 0 means EPOCHS over the train split
    eval_every: int = 25
    patience: int = 3
    seed: int = 0


def lora_layer_names(targets: str) -> list[str]:
    """keras-hub layer names for ``query,value`` / ``attention`` / ``all`` (one-line error otherwise)."""
    names = []
    for part in TARGET_GROUPS.get(targets.strip(), targets).split(","):
        part = part.strip()
        if part not in LORA_TARGETS:
            raise ValueError(f"LORA_TARGETS={targets!r}: unknown target {part!r}; use a comma list of "
                             f"{', '.join(LORA_TARGETS)}, or 'attention' or 'all'.")  # fmt: skip
        names.append(LORA_TARGETS[part])
    return names


def configure_lora(backbone, alpha: float, seed: int = 0) -> list:
    """Set ``alpha`` on every LoRA-enabled layer and draw its ``A`` matrix from ``seed``; returns the layers.

    keras-hub's ``enable_lora`` has no alpha argument and draws ``A`` from Keras' global RNG; seeding
    each layer's initializer here keeps runs reproducible without resetting global seeds.
    """
    import keras

    layers = [lyr for lyr in compat.all_layers(backbone) if getattr(lyr, "lora_enabled", False)]
    if not layers:
        raise ValueError("no LoRA-enabled layer found: call backbone.enable_lora(...) first.")
    for i, layer in enumerate(layers):
        layer.lora_alpha = float(alpha)
        a = layer.lora_kernel_a
        a.assign(keras.initializers.HeUniform(seed=seed * 100_003 + i)(a.shape, dtype=a.dtype))
    assert all(lyr.lora_alpha == float(alpha) for lyr in layers), "LoRA alpha was not applied to every layer"
    return layers


def enable_lora(lm, rank: int, targets: str = "query,value", alpha: float = 0.0, seed: int = 0) -> dict:
    """Freeze the model and add seeded rank-``rank`` adapters scaled by ``alpha / rank``; returns a parameter summary."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"RANK={rank!r} must be a positive integer.")
    lm.backbone.enable_lora(rank, target_layer_names=lora_layer_names(targets))
    configure_lora(lm.backbone, alpha or rank, seed)
    return parameter_summary(lm)


def parameter_summary(lm) -> dict:
    """Total and trainable parameter counts, trainable share and adapter size."""
    total = int(sum(np.prod(v.shape) for v in lm.backbone.weights))
    trainable = int(sum(np.prod(v.shape) for v in lm.backbone.trainable_weights))
    return {"total_params": total, "trainable_params": trainable, "trainable_share_pct": 100 * trainable / total,
            "adapter_mb": trainable * 4 / 1e6}  # fmt: skip


def mixed_precision(setting: str = "auto") -> str:
    """Set Keras' global dtype policy (call before loading the model); returns its name."""
    import jax
    import keras

    if setting not in ("auto", "on", "off"):
        raise ValueError(f"MIXED_PRECISION={setting!r}: use 'auto', 'on' or 'off'.")
    on = setting == "on" or (setting == "auto" and jax.default_backend() in ("gpu", "tpu"))
    policy = "mixed_bfloat16" if on else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def batch_dataset(arrays: dict, batch_size: int, seed: int | None, repeat_epochs: int = 1):
    """A tf.data pipeline of ``(x, y, sample_weight)`` with per-batch normalised response weights.

    Autotuning is disabled: keras-hub's default numpy path stalled 0-39 s at the end of every fit().
    """
    import tensorflow as tf

    n = len(arrays["token_ids"])
    xs, ys, ws, ms = [], [], [], []
    for epoch in range(repeat_epochs):
        order = np.random.default_rng(seed + epoch).permutation(n) if seed is not None else np.arange(n)
        for start in range(0, n - batch_size + 1 if seed is not None else n, batch_size):
            idx = order[start : start + batch_size]
            ids, mask = arrays["token_ids"][idx], arrays["padding_mask"][idx]
            weight = sequences.loss_positions(arrays["response_mask"][idx]).astype(np.float32)
            weight *= weight.size / max(weight.sum(), 1.0)  # mean over response tokens
            xs.append(ids[:, :-1])
            ms.append(mask[:, :-1])
            ys.append(ids[:, 1:])
            ws.append(weight)
    ds = tf.data.Dataset.from_generator(
        lambda: (({"token_ids": x, "padding_mask": m}, y, w) for x, m, y, w in zip(xs, ms, ys, ws)),
        output_signature=(
            {"token_ids": tf.TensorSpec((None, None), tf.int32), "padding_mask": tf.TensorSpec((None, None), tf.bool)},
            tf.TensorSpec((None, None), tf.int32),
            tf.TensorSpec((None, None), tf.float32),
        ),
    )
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options), len(xs)


def lr_schedule(cfg: TrainConfig, total_batches: int):
    """Linear warmup to ``learning_rate`` then cosine or linear decay (counted in batches)."""
    import keras

    warmup = cfg.warmup_steps * cfg.grad_accum
    decay = max(total_batches - warmup, 1)
    if cfg.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(0.0, decay, alpha=0.0, warmup_target=cfg.learning_rate, warmup_steps=warmup)
    if cfg.schedule == "linear":
        return warmup_linear(cfg.learning_rate, warmup, total_batches)
    raise ValueError(f"SCHEDULE={cfg.schedule!r}: use 'cosine' or 'linear'.")


def warmup_linear(peak: float, warmup: int, total: int):
    """A keras LearningRateSchedule: linear warmup to ``peak``, then linear decay to zero at ``total``."""
    import keras

    class WarmupLinear(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            step = keras.ops.cast(step, "float32")
            up, down = step / max(warmup, 1), (total - step) / max(total - warmup, 1)
            return peak * keras.ops.clip(keras.ops.minimum(up, down), 0.0, 1.0)

        def get_config(self):
            return {"peak": peak, "warmup": warmup, "total": total}

    return WarmupLinear()


def plan(cfg: TrainConfig, n_train: int) -> dict:
    """Batches per pass, optimizer updates, and batches to run (whole validation periods of EVAL_EVERY updates)."""
    n_batches = n_train // cfg.batch_size
    if n_batches < 1:
        raise ValueError(f"BATCH_SIZE={cfg.batch_size} is larger than the {n_train} training rows.")
    updates = cfg.max_steps or math.ceil(cfg.epochs * n_batches / cfg.grad_accum)
    steps_per_eval = min(cfg.eval_every, updates) * cfg.grad_accum
    # Keras runs whole "epochs" of EVAL_EVERY updates: round up, so the schedule matches what runs.
    total_batches = math.ceil(updates * cfg.grad_accum / steps_per_eval) * steps_per_eval
    return {"batches_per_pass": n_batches, "updates": total_batches // cfg.grad_accum, "updates_asked": updates,
            "total_batches": total_batches, "batches_per_eval": steps_per_eval}  # fmt: skip


def _step_logger_class():
    """A Keras callback class that writes one CSV row per training batch."""
    import keras

    class StepLogger(keras.callbacks.Callback):
        """CSV of step, train loss, val loss, learning rate and tokens/s."""

        def __init__(self, path: Path, tokens_per_batch: list[int]):
            super().__init__()
            self.path, self.tokens, self.rows, self.step = Path(path), tokens_per_batch, [], 0

        def on_train_batch_begin(self, batch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.running = 0.0

        def on_train_batch_end(self, batch, logs=None):
            seconds = time.perf_counter() - self.t0
            lr = float(self.model.optimizer._get_current_learning_rate())
            tokens = self.tokens[self.step % len(self.tokens)]
            # Keras reports the running mean since the epoch began; recover this batch's own loss.
            mean = float(logs["loss"])
            loss, self.running = (batch + 1) * mean - batch * self.running, mean
            self.rows.append({"step": self.step + 1, "train_loss": loss, "val_loss": "",
                              "learning_rate": lr, "tokens_per_s": round(tokens / seconds, 1)})  # fmt: skip
            self.step += 1

        def on_epoch_end(self, epoch, logs=None):
            if self.rows and logs and "val_loss" in logs:
                self.rows[-1]["val_loss"] = float(logs["val_loss"])
            self.flush()

        def flush(self):
            text = io.StringIO()
            writer = csv.DictWriter(text, LOG_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
            files.write_text(self.path, text.getvalue())

    return StepLogger


def fit_adapter(lm, train: dict, val: dict, cfg: TrainConfig, log_path: Path) -> dict:
    """Train the enabled LoRA weights of a compiled ``lm`` with keras-hub's stock ``fit``; returns the history."""
    import keras

    if getattr(lm, "optimizer", None) is None or getattr(lm, "loss", None) is None:
        raise ValueError("compile the model with an optimizer and a loss before training (see notebook 03).")
    p = plan(cfg, len(train["token_ids"]))
    n_batches, total_batches, steps_per_eval = p["batches_per_pass"], p["total_batches"], p["batches_per_eval"]
    if p["updates"] != p["updates_asked"]:
        print(f"note: training {p['updates']} updates (a multiple of EVAL_EVERY={cfg.eval_every})")
    epochs_needed = math.ceil(total_batches / n_batches)
    train_ds, _ = batch_dataset(train, cfg.batch_size, cfg.seed, repeat_epochs=epochs_needed)
    val_ds, val_batches = batch_dataset(val, cfg.batch_size, None)
    tokens = [int(train["padding_mask"][i : i + cfg.batch_size].sum()) for i in range(0, n_batches * cfg.batch_size, cfg.batch_size)]
    logger = _step_logger_class()(log_path, tokens)
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience, restore_best_weights=True, verbose=1)
    preprocessor, lm.preprocessor = lm.preprocessor, None  # inputs are already token ids
    try:
        history = lm.fit(train_ds.repeat(), validation_data=val_ds.repeat(), validation_steps=val_batches,
                         steps_per_epoch=steps_per_eval,
                         epochs=math.ceil(total_batches / steps_per_eval), callbacks=[logger, stopper], verbose=1, shuffle=False)  # fmt: skip
    finally:
        lm.preprocessor = preprocessor
    logger.flush()
    return {"history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
            "best_val_loss": float(min(history.history["val_loss"])), "updates_planned": p["updates"],
            "batches_run": len(logger.rows), "stopped_early": stopper.stopped_epoch > 0}  # fmt: skip


def train_lora(lm, train_rows: list[dict], val_rows: list[dict], cfg: TrainConfig, template,
               sequence_length: int, out_dir: Path) -> dict:  # fmt: skip
    """Tokenize, fit, and report; writes ``train_log.csv`` into ``out_dir``."""
    tokenizer = lm.preprocessor.tokenizer
    train = sequences.make_arrays(tokenizer, train_rows, template, sequence_length)
    val = sequences.make_arrays(tokenizer, val_rows, template, sequence_length)
    start = time.perf_counter()
    result = fit_adapter(lm, train, val, cfg, Path(out_dir) / "train_log.csv")
    result["train_seconds"] = round(time.perf_counter() - start, 1)
    return result


def adapter_spec(cfg: TrainConfig, model: str, template, sequence_length: int, split_sha256: dict) -> dict:
    """Everything needed to rebuild the adapter on top of its base model, and the data it saw."""
    template = prompts.as_template(template)
    return {"model": model, "template": template.style, "stop_token": template.stop, "sequence_length": sequence_length, "rank": cfg.rank,
            "targets": cfg.targets, "lora_layers": lora_layer_names(cfg.targets), "alpha": float(cfg.alpha or cfg.rank),
            "split_sha256": {s: split_sha256[s] for s in ("train", "val")}, "config": dataclasses.asdict(cfg)}  # fmt: skip


def save_adapter(lm, path: Path, spec: dict) -> tuple[Path, Path]:
    """Write ``<name>.lora.h5`` (adapter weights only) and ``<name>.json`` (its spec), atomically."""
    path = Path(path)
    if not path.name.endswith(".lora.h5"):
        raise ValueError(f"{path}: adapter files must end in .lora.h5")
    with files.atomic_path(path) as tmp:
        lm.backbone.save_lora_weights(str(tmp))
    spec_path = files.write_json(path.with_name(path.name.replace(".lora.h5", ".json")), spec)
    return path, spec_path


def load_adapter(lm, path: Path, model: str) -> dict:
    """Attach a saved adapter to ``lm`` after checking it was made for this model and shape."""
    path = Path(path)
    spec_path = path.with_name(path.name.replace(".lora.h5", ".json"))
    if not path.exists() or not spec_path.exists():
        raise FileNotFoundError(f"{path} (or its .json) not found: run notebooks/03_lora_finetune.ipynb first.")
    spec = files.read_json(spec_path)
    if spec["model"] != model:
        raise ValueError(f"{path}: adapter was trained on model={spec['model']!r}, not {model!r}; set MODEL to match.")
    import h5py

    enable_lora(lm, spec["rank"], spec["targets"], spec["alpha"])
    with h5py.File(path, "r") as f:
        stored_rank, stored = int(f["lora/vars/rank"][()]), sorted(int(k) for k in f["lora"] if k.isdigit())
    if stored_rank != spec["rank"] or stored != sorted(compat.lora_layer_indices(lm.backbone)):
        raise ValueError(f"{path}: weights (rank {stored_rank}, {len(stored)} layers) do not match its spec "
                         f"(rank {spec['rank']}, targets {spec['targets']!r}); the adapter files are inconsistent.")  # fmt: skip
    lm.backbone.load_lora_weights(str(path))
    return spec

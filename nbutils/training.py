"""LoRA fine-tuning (notebook 03): adapters, schedule, the fast training loop, adapter files.

The loop (:func:`train_lora`) is a jit-compiled JAX step built on Keras' stateless API instead of
``fit``: rows are batched by length (:mod:`nbutils.batches`), the LM head and the loss run only at
the positions whose next token is a response token, and the loss of an update is the mean over the
response tokens of all its micro-batches (GRAD_ACCUM). Early stopping keeps a copy of the best
adapter, never of the whole model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import keras
import numpy as np

from nbutils import (
    batches,
    compat,
    config,
    devices,
    files,
    heap,
    objective,
    paths,
    progress,
    prompts,
    sequences,
    variants,
)

# Our target names -> layer names inside keras-hub's Gemma decoder blocks.
LORA_TARGETS = {
    "query": "query",
    "key": "key",
    "value": "value",
    "output": "attention_output",
    "gate": "ffw_gating",
    "up": "ffw_gating_2",
    "down": "ffw_linear",
}
LOG_COLUMNS = [
    "step",
    "train_loss",
    "val_loss",
    "learning_rate",
    "tokens_per_s",
    "useful_tokens_per_s",
]
FIELD_PARAMETERS = {
    "rank": "RANK",
    "targets": "LORA_TARGETS",
    "alpha": "LORA_ALPHA",
    "scaling": "LORA_SCALING",
    "loraplus_ratio": "LORAPLUS_RATIO",
    "dora": "DORA",
    "neftune_alpha": "NEFTUNE_ALPHA",
    "learning_rate": "LEARNING_RATE",
    "weight_decay": "WEIGHT_DECAY",
    "warmup_steps": "WARMUP_STEPS",
    "schedule": "SCHEDULE",
    "clipnorm": "CLIPNORM",
    "batch_size": "BATCH_SIZE",
    "grad_accum": "GRAD_ACCUM",
    "epochs": "EPOCHS",
    "max_steps": "MAX_STEPS",
    "eval_every": "EVAL_EVERY",
    "patience": "PATIENCE",
    "min_delta": "MIN_DELTA",
    "seed": "SEED",
    "checkpoint_every": "CHECKPOINT_EVERY",
    "keep_checkpoints": "KEEP_CHECKPOINTS",
    "max_batch_tokens": "MAX_BATCH_TOKENS",
}
TARGET_GROUPS = {"attention": "query,key,value,output", "all": ",".join(LORA_TARGETS)}


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a fine-tuning run; defaults and meanings are the parameters' in ``config``."""

    rank: int = config.default("RANK")
    targets: str = config.default("LORA_TARGETS")
    alpha: float = config.default("LORA_ALPHA")
    scaling: str = config.default("LORA_SCALING")
    loraplus_ratio: float = config.default("LORAPLUS_RATIO")
    dora: bool = config.default("DORA")
    neftune_alpha: float = config.default("NEFTUNE_ALPHA")
    learning_rate: float = config.default("LEARNING_RATE")
    weight_decay: float = config.default("WEIGHT_DECAY")
    warmup_steps: int = config.default("WARMUP_STEPS")
    schedule: str = config.default("SCHEDULE")
    clipnorm: float = config.default("CLIPNORM")
    batch_size: int = config.default("BATCH_SIZE")
    grad_accum: int = config.default("GRAD_ACCUM")
    epochs: float = config.default("EPOCHS")
    max_steps: int = config.default("MAX_STEPS")
    eval_every: int = config.default("EVAL_EVERY")
    patience: int = config.default("PATIENCE")
    min_delta: float = config.default("MIN_DELTA")
    seed: int = config.default("SEED")
    checkpoint_every: int = config.default("CHECKPOINT_EVERY")
    keep_checkpoints: int = config.default("KEEP_CHECKPOINTS")
    max_batch_tokens: int = config.default("MAX_BATCH_TOKENS")

    @classmethod
    def from_parameters(cls, params: dict) -> TrainConfig:
        """The configuration from a notebook's parameters (``globals()``): each field from its
        parameter, e.g. ``rank`` from ``RANK``, the others at their defaults."""
        return cls(**{f: params[p] for f, p in FIELD_PARAMETERS.items() if p in params})

    def __post_init__(self) -> None:
        """One-line errors for values that cannot train (each names the notebook parameter)."""
        positive_int = {
            "rank": self.rank,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "eval_every": self.eval_every,
            "patience": self.patience,
            "keep_checkpoints": self.keep_checkpoints,
        }
        for name, value in positive_int.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name.upper()}={value!r} must be a positive integer.")
        for name in ("warmup_steps", "max_steps", "checkpoint_every", "max_batch_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name.upper()}={getattr(self, name)!r} must be an integer >= 0.")
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            raise ValueError(
                f"LEARNING_RATE={self.learning_rate!r} must be a number in (0, 1); LoRA typically uses 1e-4 to 1e-3."
            )
        for name in ("weight_decay", "clipnorm", "alpha", "epochs", "neftune_alpha", "min_delta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{parameter_name(name)}={value!r} must be a number >= 0.")
        ratio = self.loraplus_ratio
        if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
            raise ValueError(f"LORAPLUS_RATIO={ratio!r} must be a number > 0 (1: plain LoRA).")
        if not isinstance(self.dora, bool):
            raise ValueError(f"DORA={self.dora!r} must be True or False.")
        variants.lora_scale(1.0, 1, self.scaling)  # one-line error for an unknown scaling


def parameter_name(field: str) -> str:
    """The notebook parameter of a ``TrainConfig`` field, e.g. ``ALPHA`` -> ``LORA_ALPHA``."""
    return FIELD_PARAMETERS.get(field, field.upper())


# Knobs that may change between a run and its resumption (they do not change what is trained).
RESUMABLE_CHANGES = ("checkpoint_every", "keep_checkpoints", "max_batch_tokens")
CHECKPOINT_DIR = "checkpoints"
ADAPTER_GROUP = "adapter"  # in a .lora.h5 file: one group per LoRA layer path, holding a and b


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM or Ctrl-C stopped training after a checkpoint was written."""


def lora_layer_names(targets: str) -> list[str]:
    """keras-hub layer names for ``query,value`` / ``attention`` / ``all`` (one-line error
    otherwise)."""
    names = []
    for part in TARGET_GROUPS.get(targets.strip(), targets).split(","):
        part = part.strip()
        if part not in LORA_TARGETS:
            raise ValueError(
                f"LORA_TARGETS={targets!r}: unknown target {part!r}; use a comma list of "
                f"{', '.join(LORA_TARGETS)}, or 'attention' or 'all'."
            )
        names.append(LORA_TARGETS[part])
    return names


def seed_lora_a(layers: list, seed: int) -> None:
    """Draw each LoRA layer's ``A`` matrix with Keras' default initializer (He uniform), seeded per
    layer."""

    for i, layer in enumerate(layers):
        a = layer.lora_kernel_a
        a.assign(keras.initializers.HeUniform(seed=seed * 100_003 + i)(a.shape, dtype=a.dtype))


def lora_layers(backbone) -> list:
    """The LoRA-enabled layers of ``backbone``, depth first."""
    return [layer for layer in compat.all_layers(backbone) if getattr(layer, "lora_enabled", False)]


@contextlib.contextmanager
def adapter_off(lm):
    """Within the block ``lm`` computes as its base model: every LoRA ``B`` is zero and every DoRA
    magnitude ``‖W‖`` (their values are put back after)."""
    layers = lora_layers(lm.backbone)
    saved = [(layer.lora_kernel_b, layer.lora_kernel_b.value) for layer in layers] + [
        (layer.dora_magnitude, layer.dora_magnitude.value)
        for layer in layers
        if variants.is_dora(layer)
    ]
    try:
        for layer in layers:
            layer.lora_kernel_b.assign(keras.ops.zeros(layer.lora_kernel_b.shape))
            if variants.is_dora(layer):
                variants.reset_magnitude(layer)
        yield lm
    finally:
        for variable, value in saved:
            variable.assign(value)


def configure_lora(
    backbone, alpha: float, seed: int = 0, scaling: str = "standard", dora: bool = False
) -> list:
    """Scale every LoRA-enabled layer's update by ``alpha / r`` (``scaling="rslora"``: ``alpha /
    sqrt(r)``), draw its ``A`` from ``seed``, compute it unmerged, and with ``dora`` add DoRA's
    magnitude; returns the layers.

    keras-hub's ``enable_lora`` has no alpha argument and draws ``A`` from Keras' global RNG;
    seeding each layer's initializer here keeps runs reproducible without resetting global seeds.
    """
    layers = lora_layers(backbone)
    if layers and not (isinstance(layers[0].lora_rank, int) and layers[0].lora_rank >= 1):
        raise ValueError(f"RANK={layers[0].lora_rank!r} must be a positive integer.")
    expected = len(compat.lora_layer_indices(backbone))
    if not layers or len(layers) != expected:
        raise ValueError(
            f"found {len(layers)} LoRA-enabled layers, keras-hub enabled {expected}: "
            "call backbone.enable_lora(...) once, before configure_lora."
        )
    stored = {layer.lora_kernel_a.dtype for layer in layers}
    if stored != {"float32"}:  # keras-hub#2629: Keras before 3.15 under a bfloat16 policy
        raise ValueError(
            f"Keras {keras.__version__} stores the LoRA adapters in {', '.join(sorted(stored))}, "
            "where Adam's small updates round away; use Keras 3.15+ or MIXED_PRECISION='bf16'."
        )
    scale = variants.lora_scale(float(alpha), layers[0].lora_rank, scaling)
    for layer in layers:
        compat.unmerge_lora(layer)
        layer.lora_alpha = scale * layer.lora_rank  # Keras scales by lora_alpha / rank
        if dora:
            variants.enable_dora(layer)
    seed_lora_a(layers, seed)
    return layers


def enable_lora(
    lm,
    rank: int,
    targets: str = "query,value",
    alpha: float = 0.0,
    seed: int = 0,
    scaling: str = "standard",
    dora: bool = False,
) -> dict:
    """Freeze the model and add seeded rank-``rank`` adapters (see :func:`configure_lora`); returns
    a parameter summary."""
    lm.backbone.enable_lora(rank, target_layer_names=lora_layer_names(targets))
    configure_lora(lm.backbone, alpha or rank, seed, scaling, dora)
    return parameter_summary(lm)


def adamw(cfg: TrainConfig, updates: int):
    """AdamW with the warmup + decay schedule, global-norm clipping, and no decay on biases and norm
    scales."""

    optimizer = keras.optimizers.AdamW(
        learning_rate=lr_schedule(cfg, updates),
        weight_decay=cfg.weight_decay,
        global_clipnorm=cfg.clipnorm or None,
    )
    optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
    return optimizer


def parameter_summary(lm) -> dict:
    """Total and trainable parameter counts, trainable share and adapter size."""
    total = int(sum(np.prod(v.shape) for v in lm.backbone.weights))
    trainable = int(sum(np.prod(v.shape) for v in lm.backbone.trainable_weights))
    base = int(
        sum(
            np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in lm.backbone.non_trainable_weights
        )
    )
    return {
        "total_params": total,
        "trainable_params": trainable,
        "trainable_share_pct": 100 * trainable / total,
        "adapter_mb": trainable * 4 / 1e6,
        "base_mb": base / 1e6,
    }


def quantize_base(lm, mode: str) -> None:
    """Quantize the frozen base weights (``"int8"``: the QLoRA-style recipe) before ``enable_lora``.

    The token embedding stays in float: it is also the output layer, and through Keras' int8 reverse
    embedding the gradient reaching the adapters comes out 2-6x too small on the tiny model and
    training stalls (``tests/test_fast_training.py::test_int8_base_trains_like_fp32``).
    """

    # "Layer Dropout does not have a `quantize` method": nothing to do
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        lm.backbone.quantize(mode, filters=lambda layer: layer.name != "token_embedding")


def lr_schedule(cfg: TrainConfig, total_updates: int):
    """Linear warmup to ``learning_rate`` over WARMUP_STEPS updates, then cosine or linear decay to
    zero."""

    warmup = min(cfg.warmup_steps, max(total_updates - 1, 0))
    if cfg.schedule == "cosine":
        decay = max(total_updates - warmup, 1)
        return keras.optimizers.schedules.CosineDecay(
            0.0, decay, alpha=0.0, warmup_target=cfg.learning_rate, warmup_steps=warmup
        )
    if cfg.schedule == "linear":
        return warmup_linear(cfg.learning_rate, warmup, total_updates)
    raise ValueError(f"SCHEDULE={cfg.schedule!r}: use 'cosine' or 'linear'.")


def warmup_linear(peak: float, warmup: int, total: int):
    """A keras LearningRateSchedule: linear warmup to ``peak``, then linear decay to zero at
    ``total``."""

    class WarmupLinear(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            step = keras.ops.cast(step, "float32")
            up, down = step / max(warmup, 1), (total - step) / max(total - warmup, 1)
            return peak * keras.ops.clip(keras.ops.minimum(up, down), 0.0, 1.0)

        def get_config(self):
            return {"peak": peak, "warmup": warmup, "total": total}

    return WarmupLinear()


def plan(cfg: TrainConfig, n_train: int) -> dict:
    """Batches per pass over the training rows and optimizer updates to run (each of GRAD_ACCUM
    batches)."""
    n_batches = n_train // cfg.batch_size
    if n_batches < 1:
        raise ValueError(f"BATCH_SIZE={cfg.batch_size} is larger than the {n_train} training rows.")
    updates = cfg.max_steps or math.ceil(cfg.epochs * n_batches / cfg.grad_accum)
    if updates < 1:
        raise ValueError(
            f"MAX_STEPS={cfg.max_steps} / EPOCHS={cfg.epochs} give no update to run; set either above 0."
        )
    return {"batches_per_pass": n_batches, "updates": updates, "batches": updates * cfg.grad_accum}


def response_nll(nll, weights):
    """The loss: next-token cross-entropy summed over the response positions (``weights`` 1, else
    0).

    ``nll`` comes from :func:`nbutils.objective.scored_nll`, which runs the output layer at the
    response positions only; dividing by the update's response-token count makes it a mean per
    response token.
    """

    return keras.ops.sum(nll * weights)


def step_shape(batch) -> tuple:
    """A batch's shape as its jitted step runs it: rows padded to a multiple of the data axis."""
    return (devices.step_rows(batch.shape[0]), *batch.shape[1:])


class Trainer:
    """Jit-compiled LoRA steps on JAX: logits only at the scored positions, the loss a mean over the
    response tokens of a whole update, one optimizer step per update (Keras' stateless API).

    ``max_batch_tokens`` bounds the tokens of each step (see :func:`nbutils.batches.split_batch`): a
    wider batch runs as several micro-batches of the same update, which only lowers the memory a
    step needs. ``grad_step`` is the jitted loss-and-gradient of one step (the benchmarks and tests
    read its compiled HLO).
    """

    def __init__(
        self,
        lm,
        optimizer,
        max_batch_tokens: int = 0,
        loraplus_ratio: float = 1.0,
        neftune_alpha: float = 0.0,
    ):

        self.backbone, self.optimizer, self.max_batch_tokens = (
            lm.backbone,
            optimizer,
            max_batch_tokens,
        )
        self.loraplus_ratio, self.neftune_alpha = loraplus_ratio, neftune_alpha
        self.trainable = list(self.backbone.trainable_variables)
        if not self.trainable:
            raise ValueError(
                "the model has no trainable weights: enable LoRA first (notebook 03, step 1)."
            )
        self.optimizer.build(self.trainable)
        self.grad_step = jax.jit(jax.value_and_grad(self._loss_sum))
        self._loss = jax.jit(self._loss_sum)
        self._apply = jax.jit(self._apply_update, donate_argnums=(0, 2))
        self.compiled: set = set()  # (step kind, batch shape): one XLA compilation each

    def _loss_sum(self, trainable, non_trainable, inputs, denominator, noise_seed=None):
        """Summed response-token loss of one batch divided by ``denominator`` (the whole update's
        token count); with a ``noise_seed``, on NEFTune's noisy embeddings."""
        alpha = self.neftune_alpha if noise_seed is not None else 0.0
        key = jax.random.PRNGKey(noise_seed) if alpha else None
        with variants.noisy_embeddings(self.backbone, alpha, key):
            nll = objective.scored_nll(self.backbone, trainable, non_trainable, inputs)
        return response_nll(nll, inputs["weights"]) / denominator

    def _apply_update(self, opt_vars, grads, trainable):
        """The optimizer's step, each ``B``'s multiplied by LORAPLUS_RATIO (LoRA+)."""
        new, opt_vars = self.optimizer.stateless_apply(opt_vars, grads, trainable)
        b_mask = [variants.is_b(v) for v in self.trainable]
        return variants.scale_b_updates(trainable, new, b_mask, self.loraplus_ratio), opt_vars

    def state(self) -> tuple[list, list, list]:
        """Copies of the adapter and optimizer values (the steps donate them) and the frozen
        weights."""

        trainable, non_trainable = objective.variable_values(self.backbone)
        return (
            [jnp.array(x) for x in trainable],
            non_trainable,
            [jnp.array(v.value) for v in self.optimizer.variables],
        )

    def _mark(self, kind: str, batch) -> bool:
        """Record a step kind and shape; True when it is new (this call compiles)."""
        key = (kind, step_shape(batch))  # as place_batch runs it
        new = key not in self.compiled
        self.compiled.add(key)
        return new

    def steps(self, batch_list: list) -> list:
        """The batches as the jitted steps run them (split to at most ``max_batch_tokens`` tokens
        each)."""
        return [
            piece for b in batch_list for piece in batches.split_batch(b, self.max_batch_tokens)
        ]

    def will_compile(self, batch_list: list, kind: str = "train") -> bool:
        """Whether running ``batch_list`` meets a step shape not compiled yet."""
        return any((kind, step_shape(b)) not in self.compiled for b in self.steps(batch_list))

    def update(self, micro_batches: list, state: tuple, noise_seed: int = 0) -> tuple[float, tuple]:
        """One optimizer update over ``micro_batches``; returns their mean loss per response token
        and the new state. A non-finite loss returns the old state untouched (nothing is
        applied). ``noise_seed`` draws NEFTune's noise (when NEFTUNE_ALPHA is above 0)."""

        trainable, non_trainable, opt_vars = state
        denominator = float(sum(b.useful_tokens for b in micro_batches))
        self._release_free_heap()
        total, grads = 0.0, None
        for i, b in enumerate(self.steps(micro_batches)):
            self._mark("train", b)
            seed = np.uint32((noise_seed * 1009 + i) % 2**32) if self.neftune_alpha else None
            loss, g = self.grad_step(
                trainable, non_trainable, devices.place_batch(b.inputs()), denominator, seed
            )
            total, grads = (
                total + loss,
                g if grads is None else jax.tree_util.tree_map(lambda x, y: x + y, grads, g),
            )
        if not math.isfinite(float(total)):
            return float(total), state
        trainable, opt_vars = self._apply(opt_vars, grads, trainable)
        return float(total), (trainable, non_trainable, opt_vars)

    def mean_loss(self, batch_list: list, state: tuple) -> float:
        """Loss per response token over all batches (token-weighted, not a mean of batch means)."""
        trainable, non_trainable, _ = state
        denominator = float(sum(b.useful_tokens for b in batch_list))
        self._release_free_heap()
        pieces = self.steps(batch_list)
        for b in pieces:
            self._mark("eval", b)
        return float(
            sum(
                self._loss(trainable, non_trainable, devices.place_batch(b.inputs()), denominator)
                for b in pieces
            )
        )

    def _release_free_heap(self) -> None:
        """On the CPU, hand the last step's freed XLA scratch back to the OS, so this step's peak is
        what it uses."""
        if devices.backend() == "cpu":
            heap.release_free_heap()

    def learning_rate(self, state: tuple) -> float:
        """The learning rate the next update will use (the optimizer's schedule at its iteration
        count)."""

        with keras.StatelessScope(state_mapping=list(zip(self.optimizer.variables, state[2]))):
            return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

    def restore(self, state: tuple, trainable: list, opt_vars: list) -> tuple:
        """``state`` with the adapter and optimizer values of a checkpoint (shapes checked)."""

        for name, now, saved in (
            ("adapter", state[0], trainable),
            ("optimizer", state[2], opt_vars),
        ):
            if [tuple(x.shape) for x in now] != [tuple(x.shape) for x in saved]:
                raise ValueError(
                    f"the checkpoint's {name} weights do not fit this model (other rank, targets or model); "
                    "start a new RUN_ID or resume with the same parameters."
                )
        place = lambda saved, now: jax.device_put(jnp.asarray(saved, dtype=now.dtype), now.sharding)
        return (
            [place(x, n) for x, n in zip(trainable, state[0])],
            state[1],
            [place(x, n) for x, n in zip(opt_vars, state[2])],
        )

    def write_back(self, state: tuple) -> None:
        """Copy the adapter and optimizer values from ``state`` into the Keras variables."""
        trainable, _, opt_vars = state
        for v, value in zip(self.trainable, trainable):
            v.assign(value)
        for v, value in zip(self.optimizer.variables, opt_vars):
            v.assign(value)


def train_lora(
    lm,
    optimizer,
    train_rows: list[dict],
    val_rows: list[dict],
    cfg: TrainConfig,
    template,
    sequence_length: int,
    out_dir: Path,
    resume: bool = False,
) -> dict:
    """Train the enabled LoRA weights; validation every EVAL_EVERY updates, early stopping that
    keeps the best adapter; writes ``train_log.csv`` (one row per update) and, every
    CHECKPOINT_EVERY updates, a checkpoint into ``out_dir``; ``resume`` continues from the latest
    checkpoint there. Returns a summary.

    SIGTERM or Ctrl-C writes a checkpoint after the current update and raises
    :class:`TrainingInterrupted`.
    """
    tokenizer, out_dir = lm.preprocessor.tokenizer, Path(out_dir)
    train = sequences.make_arrays(tokenizer, train_rows, template, sequence_length)
    val_batches = batches.eval_batches(
        sequences.make_arrays(tokenizer, val_rows, template, sequence_length), cfg.batch_size
    )
    p = plan(cfg, len(train_rows))
    trainer = Trainer(lm, optimizer, cfg.max_batch_tokens, cfg.loraplus_ratio, cfg.neftune_alpha)
    state, log = trainer.state(), TrainLog(out_dir / "train_log.csv")
    run = {"update": 0, "best": math.inf, "waited": 0, "history": {"val_loss": [], "val_step": []}}
    best_adapter, checkpoints = None, out_dir / CHECKPOINT_DIR
    fingerprint = data_fingerprint(train, val_batches)
    if resume:
        state, best_adapter = _resume(checkpoints, cfg, fingerprint, trainer, state, run, log)
    else:  # a fresh run never resumes from, or rotates against, another run's checkpoints
        shutil.rmtree(checkpoints, ignore_errors=True)
    stream = _batch_stream(train, cfg)
    # the data order is a function of (SEED, pass): skip what was used
    for _ in range(run["update"] * cfg.grad_accum):
        next(stream)
    start, update, last_saved = time.perf_counter(), run["update"], latest_checkpoint(checkpoints)

    def checkpoint() -> Path:
        arrays = {"adapter": state[0], "optimizer": state[2], "best": best_adapter or []}
        return save_checkpoint(
            checkpoints,
            {**run, "update": update, "data_sha256": fingerprint},
            arrays,
            log.rows,
            cfg,
        )

    # saved outputs: the eval lines
    bar = progress.bar(p["updates"], "training", "update", enabled=progress.widgets_available())
    bar.update(run["update"])
    try:
        with stop_requests() as stop:
            for update in range(run["update"] + 1, p["updates"] + 1):
                micro = [next(stream) for _ in range(cfg.grad_accum)]
                lr = trainer.learning_rate(state)
                compiles = trainer.will_compile(micro)
                t0 = time.perf_counter()
                loss, state = trainer.update(micro, state, cfg.seed * 1_000_003 + update)
                seconds = time.perf_counter() - t0
                if not math.isfinite(loss):
                    # nothing was applied: the state is still that of the previous update
                    update -= 1
                    kept = (
                        f"the last checkpoint {last_saved} is kept"
                        if last_saved
                        else "no checkpoint was written"
                    )
                    raise FloatingPointError(
                        f"update {update + 1}: the training loss is {loss}; lower LEARNING_RATE "
                        f"(now {cfg.learning_rate}) or train in fp32 (MIXED_PRECISION='fp32'). The adapter "
                        f"of update {update} (or the best one) is left in the model; {kept}."
                    )
                log.add(
                    update,
                    loss,
                    lr,
                    sum(b.tokens for b in micro),
                    sum(b.useful_tokens for b in micro),
                    seconds,
                    compiles,
                )
                bar.update(1)
                stop_early = False
                if update % cfg.eval_every == 0 or update == p["updates"]:
                    val = trainer.mean_loss(val_batches, state)
                    run["history"]["val_loss"].append(val)
                    run["history"]["val_step"].append(update)
                    log.set_val(val)
                    print(log.summary_line(p["updates"], time.perf_counter() - start), flush=True)
                    if val < run["best"] - cfg.min_delta:  # an improvement by more than MIN_DELTA
                        # adapter only
                        run["best"], run["waited"], best_adapter = (
                            val,
                            0,
                            [np.array(x) for x in state[0]],
                        )
                    else:
                        run["waited"] += 1
                        stop_early = run["waited"] >= cfg.patience
                if stop_early:  # finishes normally, even if a stop signal came during this update
                    history = run["history"]
                    print(
                        f"early stop: no improvement by more than {cfg.min_delta:g} in {cfg.patience} evaluations; "
                        "keeping the adapter of update "
                        f"{history['val_step'][history['val_loss'].index(run['best'])]}"
                    )
                    break
                if (
                    cfg.checkpoint_every
                    and update % cfg.checkpoint_every == 0
                    and update < p["updates"]
                ):
                    last_saved = checkpoint()
                if stop and update < p["updates"]:
                    last_saved = checkpoint()
                    raise TrainingInterrupted(
                        f"{stop[0]} received: stopped after update {update}/{p['updates']}, checkpoint "
                        f"{last_saved}; resume with RESUME=True (or python -m nbutils.pipeline --resume <RUN_ID>)."
                    )
    # the Keras variables always end up holding a valid adapter: the best one, else the last one
    finally:
        bar.close()
        trainer.write_back(state)
        for v, value in zip(trainer.trainable, best_adapter or []):
            v.assign(value)
        log.flush()
    return {
        "history": run["history"],
        "best_val_loss": run["best"],
        "updates_planned": p["updates"],
        "updates_run": update,
        "batches_run": update * cfg.grad_accum,
        "stopped_early": update < p["updates"],
        "resumed_from": run.get("resumed_from"),
        "compilations": len(trainer.compiled),
        "train_seconds": round(time.perf_counter() - start, 1),
        **log.throughput(),
    }


@contextlib.contextmanager
def stop_requests():
    """While training, SIGTERM and Ctrl-C (SIGINT) are recorded instead of killing the process
    mid-update; yields the list of signal names received (handlers are restored afterwards)."""
    received: list[str] = []
    # signal handlers live in the main thread only
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    handler = lambda signum, frame: received.append(signal.Signals(signum).name)
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def save_checkpoint(
    folder: Path, run: dict, arrays: dict[str, list], log_rows: list[dict], cfg: TrainConfig
) -> Path:
    """Write ``update-NNNNNN/`` (arrays as ``.npz``, progress as JSON) atomically; keep the newest
    KEEP_CHECKPOINTS."""
    path = Path(folder) / f"update-{run['update']:06d}"
    with files.atomic_dir(path) as tmp:
        flat = {
            f"{kind}_{i:04d}": np.asarray(x)
            for kind, values in arrays.items()
            for i, x in enumerate(values)
        }
        np.savez(tmp / "arrays.npz", **flat)
        files.write_json(
            tmp / "progress.json",
            {
                **run,
                "config": dataclasses.asdict(cfg),
                "log": log_rows,
                "data_order": "batches are a function of (seed, pass); skipped on resume",
            },
        )
    for old in sorted(p for p in Path(folder).glob("update-*") if p.name < path.name)[
        : 1 - max(cfg.keep_checkpoints, 1) or None
    ]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint under ``folder`` (half-written ones never get their final
    name)."""
    found = sorted(p for p in Path(folder).glob("update-*") if (p / "progress.json").exists())
    return found[-1] if found else None


def import_checkpoint(source: str, run_id: str, out_dir: Path) -> Path:
    """Copy the latest checkpoint of ``source`` (a folder, or an attached Kaggle kernel
    ``<owner>/<kernel>``: its output's ``runs/<run_id>``) into ``out_dir``'s checkpoints, where
    ``train_lora(resume=True)`` continues from it; returns the copy."""
    local = Path(source) if Path(source).is_absolute() else paths.WORK_ROOT / source
    roots = [local] if local.is_dir() else paths.kaggle_input(source)
    places = [
        folder
        for root in roots
        for folder in (root, root / CHECKPOINT_DIR, root / "runs" / run_id / CHECKPOINT_DIR)
    ]
    latest = max(filter(None, map(latest_checkpoint, places)), key=lambda p: p.name, default=None)
    if latest is None:
        where = (
            ", ".join(map(str, places))
            or f"{source} (not a folder, nor under {paths.KAGGLE_INPUT})"
        )
        raise FileNotFoundError(
            f"RESUME_FROM={source!r}: no checkpoint in {where}; attach the earlier version's "
            "output (Add Input → Your Work) or name its folder."
        )
    copy = Path(out_dir) / CHECKPOINT_DIR / latest.name
    if latest.resolve() != copy.resolve():
        shutil.copytree(latest, copy, dirs_exist_ok=True, copy_function=shutil.copyfile)
    print(f"RESUME_FROM: checkpoint {latest} copied to {copy}")
    return copy


def load_checkpoint(path: Path) -> tuple[dict, dict[str, list]]:
    """Progress and arrays (``adapter``, ``optimizer``, ``best``) of a checkpoint; no pickle."""
    progress = files.read_json(Path(path) / "progress.json")
    arrays: dict[str, list] = {"adapter": [], "optimizer": [], "best": []}
    with np.load(Path(path) / "arrays.npz", allow_pickle=False) as f:
        for key in sorted(f.files):
            arrays[key.rsplit("_", 1)[0]].append(f[key])
    return progress, arrays


def data_fingerprint(train: dict, val_batches: list) -> str:
    """sha256 of the token ids and masks trained and validated on (data, template, sequence length,
    tokenizer)."""
    arrays = [
        train["token_ids"],
        train["response_mask"],
        *(a for b in val_batches for a in b.inputs().values()),
    ]
    return files.sha256_bytes(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays))


def _resume(
    folder: Path,
    cfg: TrainConfig,
    fingerprint: str,
    trainer: Trainer,
    state: tuple,
    run: dict,
    log: TrainLog,
) -> tuple:
    """Load the latest checkpoint into ``run``/``log``; returns the restored state and best
    adapter."""
    path = latest_checkpoint(folder)
    if path is None:
        print(f"RESUME: no checkpoint under {folder}; training from the start.")
        return state, None
    progress, arrays = load_checkpoint(path)
    # a field newer than the checkpoint was at its default then
    now, then = dataclasses.asdict(cfg), {**dataclasses.asdict(TrainConfig()), **progress["config"]}
    changed = [k for k in now if k not in RESUMABLE_CHANGES and now[k] != then[k]]
    if changed:
        raise ValueError(
            f"{path}: made with "
            + ", ".join(f"{parameter_name(k)}={then[k]!r}" for k in changed)
            + " but now "
            + ", ".join(f"{parameter_name(k)}={now[k]!r}" for k in changed)
            + "; resume with the same parameters or use a new RUN_ID."
        )
    if progress.get("data_sha256") != fingerprint:
        raise ValueError(
            f"{path}: made on other training/validation data (notebook 01 re-run, or another template, "
            "SEQUENCE_LENGTH or MAX_VAL_ROWS); resume on the same data or use a new RUN_ID."
        )
    run.update(
        {k: progress[k] for k in ("update", "best", "waited", "history")}, resumed_from=str(path)
    )
    log.rows = progress["log"]
    print(f"RESUME: continuing after update {run['update']} from {path}")
    return trainer.restore(state, arrays["adapter"], arrays["optimizer"]), arrays["best"] or None


def _batch_stream(train: dict, cfg: TrainConfig):
    """Training batches, pass after pass over the rows, each pass shuffled by ``(SEED, pass)``."""
    epoch = 0
    while True:
        yield from batches.epoch_batches(train, cfg.batch_size, cfg.seed, epoch)
        epoch += 1


class TrainLog:
    """The per-update CSV log (``LOG_COLUMNS``), written atomically after every evaluation."""

    def __init__(self, path: Path):
        self.path, self.rows = Path(path), []

    def add(
        self,
        update: int,
        loss: float,
        lr: float,
        tokens: int,
        useful: int,
        seconds: float,
        compiled: bool,
    ) -> None:
        """One optimizer update's row (its batches together); ``compiled``: its time includes a
        compilation."""
        self.rows.append(
            {
                "step": update,
                "train_loss": loss,
                "val_loss": "",
                "learning_rate": lr,
                "tokens_per_s": round(tokens / seconds, 1),
                "useful_tokens_per_s": round(useful / seconds, 1),
                "seconds": seconds,
                "tokens": tokens,
                "useful_tokens": useful,
                "compiled": compiled,
            }
        )

    def set_val(self, val_loss: float) -> None:
        """Record a validation loss on the latest row and save the log."""
        self.rows[-1]["val_loss"] = val_loss
        self.flush()

    def summary_line(self, total: int, elapsed: float) -> str:
        """A compact progress line for the latest evaluation period."""
        r = self.rows[-1]
        recent = self.rows[-10:]
        train = sum(x["train_loss"] for x in recent) / len(recent)
        return (
            f"update {r['step']:>4}/{total}  train {train:.3f}  val {r['val_loss']:.3f}  lr {r['learning_rate']:.2e}  "
            f"{self.throughput()['useful_tokens_per_s']:.0f} response tok/s  {elapsed:.0f}s"
        )

    def throughput(self) -> dict:
        """Tokens/s and response tokens/s over the updates that compiled nothing (steady state)."""
        rows = [r for r in self.rows if not r["compiled"]] or self.rows
        seconds = sum(r["seconds"] for r in rows) or 1e-9
        return {
            "tokens_per_s": round(sum(r["tokens"] for r in rows) / seconds, 1),
            "useful_tokens_per_s": round(sum(r["useful_tokens"] for r in rows) / seconds, 1),
        }

    def flush(self) -> None:
        """Write the CSV atomically."""
        files.write_csv(self.path, self.rows, LOG_COLUMNS)


def adapter_spec(
    cfg: TrainConfig, model: str, template, sequence_length: int, split_sha256: dict
) -> dict:
    """Everything needed to rebuild the adapter on top of its base model, and the data it saw."""
    template = prompts.as_template(template)
    return {
        "model": model,
        "template": template.style,
        "stop_token": template.stop,
        "sequence_length": sequence_length,
        "rank": cfg.rank,
        "targets": cfg.targets,
        "lora_layers": lora_layer_names(cfg.targets),
        "alpha": float(cfg.alpha or cfg.rank),
        "scaling": cfg.scaling,
        "dora": cfg.dora,
        "split_sha256": {s: split_sha256[s] for s in ("train", "val")},
        "config": dataclasses.asdict(cfg),
    }


def save_adapter(lm, path: Path, spec: dict) -> tuple[Path, Path]:
    """Write ``<name>.lora.h5`` (each LoRA layer's ``A`` and ``B`` under its layer path) and
    ``<name>.json`` (its spec), atomically.

    keras-hub's ``save_lora_weights`` keys layers by their index among layers with weights, which
    need not be the same in a freshly built model (keras-hub#2701); a layer's path is.
    """
    path = Path(path)
    if not path.name.endswith(".lora.h5"):
        raise ValueError(f"{path}: adapter files must end in .lora.h5")
    with files.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for layer in lora_layers(lm.backbone):
            group = f.create_group(f"{ADAPTER_GROUP}/{layer.path}")
            group["a"] = keras.ops.convert_to_numpy(layer.lora_kernel_a)
            group["b"] = keras.ops.convert_to_numpy(layer.lora_kernel_b)
            if variants.is_dora(layer):
                group["m"] = keras.ops.convert_to_numpy(layer.dora_magnitude)
    spec_path = files.write_json(path.with_name(path.name.replace(".lora.h5", ".json")), spec)
    return path, spec_path


def stored_adapter(path: Path) -> dict[str, dict]:
    """``{layer path: {"a": A, "b": B[, "m": DoRA magnitude]}}`` of an adapter file written by
    :func:`save_adapter`."""
    with h5py.File(path, "r") as f:
        stored = {}
        f[ADAPTER_GROUP].visititems(
            lambda name, item: (
                stored.update({name: {k: item[k][()] for k in item}})
                if isinstance(item, h5py.Group) and "a" in item
                else None
            )
        )
    return stored


def load_adapter(lm, path: Path, model: str) -> dict:
    """Attach a saved adapter to ``lm`` after checking it was made for this model and shape."""
    path = Path(path)
    spec_path = path.with_name(path.name.replace(".lora.h5", ".json"))
    if not path.exists() or not spec_path.exists():
        raise FileNotFoundError(
            f"{path} (or its .json) not found: run notebooks/03_lora_finetune.ipynb first."
        )
    spec = files.read_json(spec_path)
    if spec["model"] != model:
        raise ValueError(
            f"{path}: adapter was trained on model={spec['model']!r}, not {model!r}; set MODEL to match."
        )

    scaling, dora = spec.get("scaling", "standard"), spec.get("dora", False)
    enable_lora(lm, spec["rank"], spec["targets"], spec["alpha"], scaling=scaling, dora=dora)
    with h5py.File(path, "r") as f:
        legacy = ADAPTER_GROUP not in f
    if legacy:  # written by keras-hub's save_lora_weights (before this format)
        load_keras_hub_adapter(lm, path, spec)
        return spec
    stored, layers = stored_adapter(path), {layer.path: layer for layer in lora_layers(lm.backbone)}
    shapes = {p: tuple(layer.lora_kernel_a.shape) for p, layer in layers.items()}
    if {p: arrays["a"].shape for p, arrays in stored.items()} != shapes or any(
        ("m" in arrays) != dora for arrays in stored.values()
    ):
        ranks = sorted({arrays["a"].shape[-1] for arrays in stored.values()})
        raise ValueError(
            f"{path}: it holds {len(stored)} layers of rank {'/'.join(map(str, ranks))}, its spec "
            f"(rank {spec['rank']}, targets {spec['targets']!r}, DoRA {dora}) gives this model {len(layers)}; "
            "the adapter files are inconsistent."
        )
    for layer_path, arrays in stored.items():
        layer = layers[layer_path]
        layer.lora_kernel_a.assign(arrays["a"])
        layer.lora_kernel_b.assign(arrays["b"])
        if dora:
            layer.dora_magnitude.assign(arrays["m"])
    return spec


def load_keras_hub_adapter(lm, path: Path, spec: dict) -> None:
    """Load an adapter file in keras-hub's own format (layers keyed by index), checked against
    ``spec``."""
    with h5py.File(path, "r") as f:
        stored_rank, stored = (
            int(f["lora/vars/rank"][()]),
            sorted(int(k) for k in f["lora"] if k.isdigit()),
        )
    if stored_rank != spec["rank"] or stored != sorted(compat.lora_layer_indices(lm.backbone)):
        raise ValueError(
            f"{path}: weights (rank {stored_rank}, {len(stored)} layers) do not match its spec "
            f"(rank {spec['rank']}, targets {spec['targets']!r}); the adapter files are inconsistent."
        )
    lm.backbone.load_lora_weights(str(path))

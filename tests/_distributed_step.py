"""One training step of the tiny model under each DISTRIBUTION; run by test_distribution.py in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4. Prints one JSON line per
set-up."""

import json
import math
import re
import sys

import numpy as np

import nbutils  # noqa: F401  (KERAS_BACKEND=jax)
from nbutils import batches, devices, models, prompts, sequences, training

ROWS = [
    {
        "id": str(i),
        "instruction": "Summarize.",
        "input": "x = 1\n" * (1 + 2 * i),
        "output": "word " * (1 + i),
    }
    for i in range(8)
]


def axes(sharding) -> list:
    """A sharding's partition spec as a list without trailing Nones (jax versions print it
    differently)."""
    spec = list(getattr(sharding, "spec", []))
    while spec and spec[-1] is None:
        spec.pop()
    return spec


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# The layout GEMMA_LAYOUT replaced: q/k/v split over the hidden (contracting) dimension, the
# attention output over its output; kept here to measure the choice against it.
HIDDEN_SPLIT = {
    **{k: v for k, v in devices.GEMMA_LAYOUT.items() if "attention" not in k},
    r"decoder_block_\d+/attention/(query|key|value)/kernel": (None, devices.MODEL_AXIS, None),
    r"decoder_block_\d+/attention/attention_output/kernel": (None, None, devices.MODEL_AXIS),
}


def collectives(hlo: str) -> int:
    """Collective operations in a compiled module's text."""
    return sum(len(re.findall(rf"= [^=\n]*? {c}(-start)?\(", hlo)) for c in COLLECTIVES)


# DoRA, rsLoRA, LoRA+ and NEFTune at once (the "variants/" set-ups)
VARIANTS = {
    "lora": {"scaling": "rslora", "dora": True},
    "loraplus_ratio": 4.0,
    "neftune_alpha": 5.0,
}


def compiled_step(trainer, state, batch) -> str:
    """The text of the compiled gradient step for ``batch`` (its HLO after XLA's passes)."""
    inputs = devices.place_batch(batch.inputs())
    return trainer.grad_step.lower(state[0], state[1], inputs, 1.0).compile().as_text()


def step(spec: str, model: str = "tiny", variants: bool = False, hlo: bool = True) -> dict:
    """Loss, updated adapter and kernel shardings after one update of a seeded tiny model; with
    ``hlo``, the compiled step's collectives and the most entries one device's output-layer matmul
    runs on (the largest compiled size); ``variants``: with :data:`VARIANTS`."""
    import keras

    devices.use_distribution(spec)
    lm = models.load_gemma(model, sequence_length=128)
    lm.backbone.token_embedding.embeddings.assign(lm.backbone.token_embedding.embeddings * 40.0)
    options = VARIANTS if variants else {"lora": {}}
    training.enable_lora(lm, 4, "all", 8, seed=0, **options["lora"])
    rng = np.random.default_rng(1)
    for var in lm.backbone.trainable_weights:  # non-zero B, so every adapter matrix gets a gradient
        noise = rng.normal(size=var.shape).astype("float32") * 0.05
        var.assign(var * (1 + noise) if "dora" in var.path else noise)
    style = prompts.auto_style(model, lm.preprocessor.tokenizer)
    arrays = sequences.make_arrays(lm.preprocessor.tokenizer, ROWS, style, 128)
    trainer = training.Trainer(
        lm,
        keras.optimizers.AdamW(learning_rate=1e-2, epsilon=1e-3),
        loraplus_ratio=options.get("loraplus_ratio", 1.0),
        neftune_alpha=options.get("neftune_alpha", 0.0),
    )
    # 3 and 5 rows: neither divides the data axis, so place_batch pads both with zero-weight rows
    micro = [
        batches.make_batch(arrays, np.arange(0, 3)),
        batches.make_batch(arrays, np.arange(3, 8)),
    ]
    loss, state = trainer.update(micro, trainer.state(), noise_seed=7)
    trainer.write_back(state)
    compiled = (
        compiled_step(trainer, state, batches.make_batch(arrays, np.arange(0, 4))) if hlo else ""
    )
    out_dims = [
        [int(d) for d in dims.split(",")]
        for dims in re.findall(r"= f32\[([\d,]+)\]\S* dot\(", compiled)
    ]
    # 0: vocabulary sharded
    head_rows = (
        max(
            (math.prod(d[:-1]) for d in out_dims if d[-1] == lm.backbone.vocabulary_size), default=0
        )
        if hlo
        else None
    )
    specs = {v.path: axes(v.value.sharding) for v in lm.backbone.weights}
    return {
        "spec": spec,
        "loss": loss,
        "adapter": [np.asarray(v.value).tolist() for v in trainer.trainable],
        "shardings": specs,
        "batch_axes": axes(
            getattr(devices.place_batch(micro[0].inputs())["token_ids"], "sharding", None)
        ),
        "adapter_devices": len(trainer.trainable[0].value.sharding.device_set),
        "collectives": collectives(compiled) if hlo else None,
        "padded_rows": devices.place_batch(micro[0].inputs())["token_ids"].shape[0],
        "head_rows": head_rows,
    }


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        if spec == "hidden-split":  # model:2x2 with the rejected layout (keep it last)
            devices.GEMMA_LAYOUT.clear()
            devices.GEMMA_LAYOUT.update(HIDDEN_SPLIT)
            print(json.dumps({**step("model:2x2"), "spec": spec}), flush=True)
        elif spec.startswith("gemma4/"):  # the same on the tiny Gemma 4
            print(
                json.dumps({**step(spec[7:], "tiny-gemma4", hlo=False), "spec": spec}), flush=True
            )
        elif spec.startswith("variants/"):  # the same with every LoRA variant
            print(
                json.dumps({**step(spec[9:], variants=True, hlo=False), "spec": spec}), flush=True
            )
        else:
            try:
                print(json.dumps(step(spec)), flush=True)
            except models.ModelLoadError as exc:  # the one line a user would see
                print(json.dumps({"spec": spec, "error": str(exc)}), flush=True)

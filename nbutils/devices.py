"""Accelerators and scale-out: which devices JAX sees, a memory estimate before training, and
``keras.distribution`` set-ups (data parallel, or a 2-D mesh with a Gemma 3 layout map)."""

from __future__ import annotations

import math
import os
import re

import jax
import keras
import numpy as np

BATCH_AXIS, MODEL_AXIS = "batch", "model"
# Gemma 3 and 4 weights sharded over the model axis (keras-hub has no layout map for Gemma 3: keras-hub
# #2828; its Gemma map shards key/value over heads, which Gemma 3's single key/value head cannot
# be). Query and attention output are split by heads, so each device attends with its own heads
# and one all-reduce per block joins them; key/value (one head in 270M and 1B) are replicated.
# On the 4-device CPU mesh this compiles an update with fewer collectives than splitting q/k/v
# over the hidden dimension (docs/design.md; tests/test_distribution.py). Everything else (norms,
# LoRA A/B) is replicated. The query heads must divide the model axis. Gemma 4 (keras-hub 0.32 has
# no layout map for it either) names its layers the same way; its per-layer embedding table
# (vocabulary, layers x 256: about half of E2B's weights) is split by vocabulary rows like the
# token embedding.
GEMMA_LAYOUT = {
    r"(per_layer_)?token_embedding/embeddings": (MODEL_AXIS, None),  # (vocabulary, hidden)
    # (heads, hidden, head_dim)
    r"decoder_block_\d+/attention/query/kernel": (MODEL_AXIS, None, None),
    # (heads, head_dim, hidden)
    r"decoder_block_\d+/attention/attention_output/kernel": (MODEL_AXIS, None, None),
    r"decoder_block_\d+/ffw_gating(_2)?/kernel": (None, MODEL_AXIS),  # (hidden, intermediate)
    r"decoder_block_\d+/ffw_linear/kernel": (MODEL_AXIS, None),  # (intermediate, hidden)
}


def backend() -> str:
    """``cpu``, ``gpu`` or ``tpu``: where JAX runs."""

    return jax.default_backend()


# MIXED_PRECISION -> Keras dtype policy; "auto" picks bf16 only where the chip computes it natively.
# "bf16-weights" also stores the weights in bf16 (LoRA adapters and optimizer stay fp32).
POLICIES = {"bf16": "mixed_bfloat16", "fp32": "float32", "bf16-weights": "bfloat16"}
# "auto" stores the weights in bf16 where fp32 weights alone would take more of a device
WEIGHTS_SHARE = 0.6
BF16_CAPABILITY = (8, 0)  # NVIDIA Ampere and newer have bf16 tensor cores; a T4 (7.5) has none
FP16_REFUSAL = (
    "MIXED_PRECISION='fp16' is not offered: fp16 needs loss scaling and Gemma's activations "
    "overflow its range; use 'fp32' (a T4's choice under 'auto') or 'bf16' to save memory."
)


def device_facts() -> tuple[str, str, str]:
    """(platform, device kind, CUDA compute capability or "") of JAX's first device."""
    device = jax.devices()[0]
    return device.platform, device.device_kind, str(getattr(device, "compute_capability", ""))


def precision_policy(
    setting: str,
    platform: str,
    capability: str = "",
    fp32_weights_gb: float = 0.0,
    device_gb: float = math.inf,
) -> tuple[str, str]:
    """The dtype policy for ``MIXED_PRECISION`` on a device, and the reason in a few words."""
    if setting == "fp16":
        raise ValueError(FP16_REFUSAL)
    if setting in POLICIES:
        return POLICIES[setting], f"{setting} as asked"
    if setting != "auto":
        raise ValueError(
            f"MIXED_PRECISION={setting!r}: use 'auto', 'bf16', 'bf16-weights' or 'fp32'."
        )
    if fp32_weights_gb > WEIGHTS_SHARE * device_gb:
        return POLICIES["bf16-weights"], (
            f"auto: fp32 weights ({fp32_weights_gb:.1f} GB) would fill over "
            f"{WEIGHTS_SHARE:.0%} of the device's {device_gb:.1f} GB"
        )
    if platform == "tpu":
        return POLICIES["bf16"], "auto: the TPU computes bf16"
    version = re.fullmatch(r"(\d+)\.(\d+)", capability) if platform == "gpu" else None
    if version and (int(version[1]), int(version[2])) >= BF16_CAPABILITY:
        return POLICIES["bf16"], f"auto: compute capability {capability} computes bf16"
    if version:
        return POLICIES["fp32"], f"auto: compute capability {capability} has no bf16 units"
    return POLICIES["fp32"], f"auto: {platform} {capability}".rstrip()


def weights_gb(params: int, policy: str, model_axis: int = 1) -> float:
    """GB of ``params`` weights stored in ``policy`` on one device, split over the model axis (the
    layout map's kernels are nearly all of a Gemma's weights)."""
    return params * (2 if policy == "bfloat16" else 4) / model_axis / 1e9


def use_precision(setting: str = "auto", params: int = 0) -> str:
    """Set Keras' global dtype policy for ``MIXED_PRECISION`` on JAX's device (call before the
    model is built, after the distribution), print it with its reason; returns the policy name.

    ``params``: the model's parameter count where known before loading (a keras-hub preset's): its
    weights per device are printed, weigh in ``"auto"``, and a set-up whose weights alone cannot fit
    is refused in one line.
    """
    platform, kind, capability = device_facts()
    model_axis, device = mesh_axes()[1], device_memory_gb()
    fp32 = weights_gb(params, "float32", model_axis)
    policy, reason = precision_policy(setting, platform, capability, fp32, device)
    keras.mixed_precision.set_global_policy(policy)
    print(f"dtype policy {policy} on {kind} ({reason})")
    if params:
        need = weights_gb(params, policy, model_axis)
        print(f"weights: {params / 1e9:.2f}B parameters, {need:.1f} GB per device of {device:.1f}")
        if need > 0.9 * device:
            bf16 = "" if policy == "bfloat16" else "MIXED_PRECISION='bf16-weights', "
            raise ValueError(
                f"the model's {params / 1e9:.1f}B parameters need {need:.1f} GB per device in "
                f"{policy}, the device has {device:.1f} GB: use {bf16}more devices on the model "
                "axis (03 and 05: DISTRIBUTION='model:<data>x<model>'), or a smaller MODEL."
            )
    return policy


def require_accelerator(required: bool) -> None:
    """Stop with one line when an accelerator is required and JAX sees only the CPU."""
    if required and backend() == "cpu":
        raise SystemExit(
            "REQUIRE_ACCELERATOR=True but JAX sees only the CPU: on Kaggle choose a GPU or TPU "
            "(Settings → Accelerator), or set REQUIRE_ACCELERATOR=False to train on the CPU (slow)."
        )


def device_memory_gb() -> float:
    """Memory of one accelerator (JAX's limit), or of the machine on CPU."""

    stats = jax.devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return stats["bytes_limit"] / 1e9
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


MEMORY_PARTS = ("weights", "adapter_optimizer", "activations", "logits")


def mesh_axes() -> tuple[int, int]:
    """(data, model) sizes of Keras' current device mesh; (1, 1) without a distribution."""
    dist = keras.distribution.distribution()
    if dist is None:
        return 1, 1
    names, shape = dist.device_mesh.axis_names, dist.device_mesh.shape
    return data_devices(dist), shape[names.index(MODEL_AXIS)] if MODEL_AXIS in names else 1


def sharded_over_model(path: str) -> bool:
    """Whether the Gemma 3 layout map shards the weight at ``path`` over the model axis."""
    return any(re.search(pattern, path) for pattern in GEMMA_LAYOUT)


def memory_estimate(
    lm, batch_size: int, sequence_length: int, scored: int, mesh: tuple[int, int] | None = None
) -> dict[str, float]:
    """Rough training memory in GB on each device of ``mesh`` (data, model; default: Keras'
    current one): frozen weights (the layout map's kernels split over the model axis), adapter +
    AdamW slots + gradients (replicated), and the activations kept for the backward pass and the
    scored positions' logits and gradient of the step's rows on one device (split over data)."""

    data, model = mesh or mesh_axes()
    backbone = lm.backbone
    weights = sum(
        np.prod(v.shape) * np.dtype(v.dtype).itemsize / (model if sharded_over_model(v.path) else 1)
        for v in backbone.non_trainable_weights
    )
    # fp32 value, 2 Adam slots, gradient
    adapter = sum(np.prod(v.shape) for v in backbone.trainable_weights) * 4 * 4
    act_bytes = 2 if "16" in backbone.dtype_policy.compute_dtype else 4
    rows = -(-batch_size // data)  # a device's rows (place_batch pads the step to a multiple)
    per_layer = (
        12 * backbone.hidden_dim
        + 3 * backbone.intermediate_dim
        + backbone.num_query_heads * sequence_length
    )
    activations = rows * sequence_length * per_layer * backbone.num_layers * act_bytes
    # fp32 logits, softmax and its gradient
    logits = rows * scored * backbone.vocabulary_size * 4 * 3
    gb = {
        "weights": weights,
        "adapter_optimizer": adapter,
        "activations": activations,
        "logits": logits,
    }
    gb = {k: float(v) / 1e9 for k, v in gb.items()}
    gb["total"] = sum(gb.values())
    gb["device"] = device_memory_gb()
    gb["mesh"] = f"{data}x{model}"
    return gb


def memory_table(estimate: dict[str, float]) -> str:
    """One line of the estimate, for the notebook."""
    parts = ", ".join(f"{k} {estimate[k]:.2f}" for k in MEMORY_PARTS)
    verdict = (
        "fits"
        if estimate["total"] < 0.9 * estimate["device"]
        else "may NOT fit: lower BATCH_SIZE (raise GRAD_ACCUM)"
    )
    return (
        f"memory estimate per device (GB, mesh {estimate['mesh']} data x model): {parts} = "
        f"{estimate['total']:.2f} of {estimate['device']:.1f} on {backend()} ({verdict})"
    )


def parse_distribution(spec: str, n_devices: int) -> tuple[int, int] | None:
    """``(data, model)`` mesh shape for a ``DISTRIBUTION`` value, or None for a single device."""
    if spec == "none" or (spec == "auto" and n_devices == 1):
        return None
    if spec in ("auto", "data"):
        return (n_devices, 1)
    match = re.fullmatch(r"model:(\d+)x(\d+)", spec)
    if not match:
        raise ValueError(
            f"DISTRIBUTION={spec!r}: use 'auto', 'none', 'data' or 'model:<data>x<model>' (e.g. 'model:2x2')."
        )
    data, model = int(match[1]), int(match[2])
    if data * model != n_devices:
        raise ValueError(
            f"DISTRIBUTION={spec!r} needs {data * model} devices; JAX sees {n_devices}."
        )
    return (data, model)


def gemma_layout_map(mesh):
    """A ``keras.distribution.LayoutMap`` sharding Gemma 3's large kernels over the mesh's model
    axis."""

    layout_map = keras.distribution.LayoutMap(mesh)
    for pattern, axes in GEMMA_LAYOUT.items():
        layout_map[pattern] = axes
    return layout_map


def use_distribution(spec: str = "auto"):
    """Set Keras' global distribution for ``DISTRIBUTION`` (before the model is built); returns it
    or None."""

    devices = jax.devices()
    shape = parse_distribution(spec, len(devices))
    if shape is None:
        keras.distribution.set_distribution(None)
        return None
    if shape[1] == 1:
        dist = keras.distribution.DataParallel(devices=devices)
    else:
        mesh = keras.distribution.DeviceMesh(shape, [BATCH_AXIS, MODEL_AXIS], devices)
        dist = keras.distribution.ModelParallel(
            layout_map=gemma_layout_map(mesh), batch_dim_name=BATCH_AXIS
        )
    keras.distribution.set_distribution(dist)
    print(
        f"DISTRIBUTION={spec!r}: {type(dist).__name__} over {len(devices)} {devices[0].platform} devices, "
        f"mesh {shape[0]} (data) x {shape[1]} (model)"
    )
    return dist


def data_devices(dist) -> int:
    """Size of the data (batch) axis of a Keras distribution's device mesh."""
    return dist.device_mesh.shape[dist.device_mesh.axis_names.index(dist.batch_dim_name)]


def data_shards(rows: int) -> int:
    """Devices :func:`place_batch` splits a batch of ``rows`` rows over (1: not split)."""

    dist = keras.distribution.distribution()
    return 1 if dist is None or rows % data_devices(dist) else data_devices(dist)


def step_rows(rows: int) -> int:
    """The rows a step of ``rows`` rows runs with: padded to a multiple of the data axis."""
    dist = keras.distribution.distribution()
    return rows if dist is None else -(-rows // data_devices(dist)) * data_devices(dist)


def padded_rows(inputs: dict, multiple: int) -> dict:
    """``inputs`` with rows appended up to a multiple of ``multiple``: copies of the first row with
    zero weights, so they add nothing to a loss or gradient (and no all-padding row is attended)."""
    rows = len(inputs["token_ids"])
    extra = -rows % multiple
    if not extra:
        return inputs
    return {
        k: np.concatenate([x, np.zeros_like(x[:1]).repeat(extra, 0)])
        if k == "weights"
        else np.concatenate([x, np.asarray(x)[:1].repeat(extra, 0)])
        for k, x in inputs.items()
    }


def place_batch(inputs: dict) -> dict:
    """Split a step's rows over the data axis of Keras' current distribution (unchanged without
    one), padded with zero-weight rows to a multiple of it: never replicated on every device."""

    dist = keras.distribution.distribution()
    if dist is None:
        return inputs
    inputs = padded_rows(inputs, data_devices(dist))
    return {
        k: keras.distribution.distribute_tensor(x, dist.get_data_layout(x.shape))
        for k, x in inputs.items()
    }

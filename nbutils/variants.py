"""LoRA variants Keras and keras-hub do not ship: rsLoRA, LoRA+, DoRA and NEFTune.

- **rsLoRA** scales the update by ``alpha / sqrt(r)`` instead of ``alpha / r``
  (:func:`lora_scale`); Keras' LoRA layers compute ``lora_alpha / r``, so the layer gets
  ``lora_alpha = scale * r``.
- **LoRA+** gives every ``B`` a learning rate ``LORAPLUS_RATIO`` times ``A``'s
  (:func:`scale_b_updates`): AdamW's step of a variable is proportional to its learning rate, decay
  included, so ``B``'s step is the optimizer's times the ratio.
- **DoRA** computes ``m · (W + s·A·B) / ‖W + s·A·B‖`` with one trained magnitude ``m`` per output
  unit, the norm over the kernel's input axes; ``m`` starts at ``‖W‖``, so an untrained DoRA layer
  is the base layer (:func:`enable_dora`, :func:`merged_kernel`).
- **NEFTune** adds uniform noise of size ``alpha / sqrt(L·d)`` to the embeddings the decoder
  receives (after Gemma's ``sqrt(d)`` scale, as transformers' Gemma 3 embedding does), while
  training only (:func:`noisy_embeddings`).
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import keras
from keras import ops

from nbutils import compat

SCALINGS = ("standard", "rslora")
MAGNITUDE = "dora_magnitude"  # the DoRA magnitude variable's name in a LoRA layer


def lora_scale(alpha: float, rank: int, scaling: str = "standard") -> float:
    """The factor on ``A·B``: ``alpha / r`` (``standard``) or ``alpha / sqrt(r)`` (``rslora``)."""
    if scaling not in SCALINGS:
        raise ValueError(f"LORA_SCALING={scaling!r}: use {' or '.join(map(repr, SCALINGS))}.")
    return alpha / (math.sqrt(rank) if scaling == "rslora" else rank)


def kernel_axes(equation: str) -> tuple[tuple[int, ...], str]:
    """For an ``EinsumDense`` equation, the kernel's input (contracted) axes and its output letters,
    e.g. ``btd,ndh->btnh`` gives ``((1,), "nh")``."""
    inputs, output = equation.split("->")
    kernel = inputs.split(",")[1]
    contracted = tuple(i for i, letter in enumerate(kernel) if letter not in output)
    return contracted, "".join(letter for letter in kernel if letter in output)


def column_norms(kernel, equation: str):
    """``‖kernel‖`` over its input axes, one value per output unit (float32, kept dims dropped)."""
    contracted, _ = kernel_axes(equation)
    return ops.sqrt(ops.sum(ops.square(ops.cast(kernel, "float32")), axis=contracted))


def direction(layer):
    """``W + s·A·B`` of a LoRA layer, in float32."""
    update = ops.matmul(layer.lora_kernel_a, layer.lora_kernel_b)
    scale = layer.lora_alpha / layer.lora_rank
    return ops.cast(compat.base_kernel(layer), "float32") + scale * update


def magnitude_over_norm(layer):
    """DoRA's per-output factor ``m / ‖W + s·A·B‖`` (float32)."""
    return layer.dora_magnitude / column_norms(direction(layer), layer.equation)


def merged_kernel(layer):
    """The kernel a LoRA layer computes with: ``W + s·A·B``, or for DoRA ``m·(W + s·A·B)/‖…‖``."""
    if not is_dora(layer):
        return layer.kernel
    contracted, _ = kernel_axes(layer.equation)
    factor = magnitude_over_norm(layer)
    for axis in contracted:
        factor = ops.expand_dims(factor, axis)
    return ops.cast(direction(layer) * factor, compat.base_kernel(layer).dtype)


def is_dora(layer) -> bool:
    """Whether ``layer`` has a DoRA magnitude."""
    return hasattr(layer, MAGNITUDE)


def enable_dora(layer) -> None:
    """Give a LoRA-enabled ``EinsumDense`` a trained magnitude ``m = ‖W‖`` and DoRA's forward.

    The forward stays unmerged (see ``compat.unmerge_lora``): ``(x·W + s·(x·A)·B)`` times
    ``m / ‖W + s·A·B‖`` per output unit. The norm is not detached: its gradient is exact.
    """
    if getattr(layer, "quantization_mode", None):
        raise ValueError("DORA=True needs float base weights; set QUANTIZE='' for DoRA.")
    norms = column_norms(compat.base_kernel(layer), layer.equation)
    compat.add_weight_after_build(
        layer, MAGNITUDE, tuple(norms.shape), keras.initializers.Constant(0.0)
    )
    layer.dora_magnitude.assign(norms)
    _, letters = kernel_axes(layer.equation)
    output = layer.equation.split("->")[1]
    rescale = f"{output},{letters}->{output}"

    def call(inputs, training=None):
        x = ops.einsum(layer.equation, inputs, compat.base_kernel(layer))
        low = compat.low_rank_product(
            ops.einsum(layer.equation, inputs, layer.lora_kernel_a), layer.lora_kernel_b
        )
        x = ops.add(x, ops.multiply(low, layer.lora_alpha / layer.lora_rank))
        # in float32: a bf16 factor would round away magnitude changes under ~0.4%
        x = ops.cast(
            ops.einsum(rescale, ops.cast(x, "float32"), magnitude_over_norm(layer)), x.dtype
        )
        if layer.bias is not None:
            x = ops.add(x, layer.bias)
        return layer.activation(x) if layer.activation is not None else x

    layer.call = call


def magnitude_is_initial(layer) -> bool:
    """Whether a DoRA magnitude still equals ``‖W‖`` (always True for a plain LoRA layer)."""
    if not is_dora(layer):
        return True
    norms = column_norms(compat.base_kernel(layer), layer.equation)
    return bool(ops.all(ops.equal(layer.dora_magnitude, norms)))


def reset_magnitude(layer) -> None:
    """Set a DoRA magnitude back to ``‖W‖`` (with ``B`` zero, the layer is its base layer again)."""
    layer.dora_magnitude.assign(column_norms(compat.base_kernel(layer), layer.equation))


def is_b(variable) -> bool:
    """Whether ``variable`` is a LoRA ``B`` matrix."""
    return variable.path.endswith("lora_kernel_b")


def scale_b_updates(before: list, after: list, b_mask: list[bool], ratio: float) -> list:
    """LoRA+: each ``B``'s step ``after - before`` multiplied by ``ratio`` (the others as they
    are)."""
    if ratio == 1:
        return after
    return [old + ratio * (new - old) if b else new for old, new, b in zip(before, after, b_mask)]


def neftune_noise(key, shape: tuple, alpha: float, dtype):
    """NEFTune's noise for embeddings of ``shape`` ``(rows, L, d)``: uniform in ``±alpha/sqrt(L·d)``.
    Each row draws from its own key (``key`` folded with the row's index), so rows a device mesh
    adds to a batch leave the other rows' noise as it is."""
    bound = alpha / math.sqrt(shape[1] * shape[2])
    keys = jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.arange(shape[0]))
    draw = lambda k: jax.random.uniform(k, shape[1:], "float32", -bound, bound)
    return jax.vmap(draw)(keys).astype(dtype)


@contextlib.contextmanager
def noisy_embeddings(backbone, alpha: float, key):
    """Within the block, ``backbone``'s token embedding adds NEFTune noise (scaled for after its
    ``sqrt(d)`` factor); nothing when ``alpha`` is 0."""
    layer = backbone.token_embedding
    if not alpha:
        yield
        return
    plain, factor = layer.call, math.sqrt(backbone.hidden_dim)

    def call(inputs, reverse=False):
        x = plain(inputs, reverse=reverse)
        if reverse:
            return x
        return x + neftune_noise(key, tuple(x.shape), alpha, x.dtype) / factor

    own = layer.__dict__.get("call")  # an instance's own call, if it has one
    layer.call = call
    try:
        yield
    finally:
        if own is None:
            del layer.call  # the class's call again
        else:
            layer.call = own

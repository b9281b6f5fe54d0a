"""The few non-public APIs of Keras, keras-hub, kagglehub and sacrebleu the project relies on, in
one place.

Each has a test in ``tests/test_compat.py`` (the decoding ones in ``tests/test_decoding.py``) that
fails loudly, naming the function, when an upstream release changes it. Everything else in
``nbutils`` uses public APIs only.
"""

from __future__ import annotations

import os

import jax
import keras
import keras_hub
from keras import ops


def all_layers(model) -> list:
    """Every sub-layer of ``model``, depth first (Keras has no public recursive traversal)."""
    return list(model._flatten_layers(include_self=False))


def lora_layer_indices(backbone) -> list[int]:
    """Indices keras-hub's ``save_lora_weights`` uses for the LoRA layers (among layers with
    weights)."""
    return list(getattr(backbone, "_lora_enabled_layers", []))


def unmerge_lora(layer) -> None:
    """Make a LoRA-enabled ``EinsumDense`` compute ``x·W + (alpha/r)·(x·A)·B`` instead of Keras'
    ``x·(W + (alpha/r)·A·B)``.

    Same result; but with the merged kernel, backpropagation forms the full gradient of ``W`` (as
    many FLOPs as the forward pass) only to project it onto ``A`` and ``B``. Unmerged, it never
    does. ``(x·A)·B`` runs as one 2-D matmul over all token rows: as a batched ``(batch, tokens,
    r)`` product, the gradient of ``B`` contracts two axes and XLA's CPU backend transposes the
    incoming gradient for it (fused into the MLP's gelu backward: over a quarter of a LoRA step of
    Gemma 3 270M on 2 CPU cores).
    """

    if getattr(layer, "quantization_mode", None) or not getattr(layer, "lora_enabled", False):
        return

    def call(inputs, training=None):
        x = keras.ops.einsum(layer.equation, inputs, layer._kernel)
        low = low_rank_product(
            keras.ops.einsum(layer.equation, inputs, layer.lora_kernel_a), layer.lora_kernel_b
        )
        x = keras.ops.add(x, keras.ops.multiply(low, layer.lora_alpha / layer.lora_rank))
        if layer.bias is not None:
            x = keras.ops.add(x, layer.bias)
        return layer.activation(x) if layer.activation is not None else x

    layer.call = call


def base_kernel(layer):
    """The frozen kernel ``W`` of a LoRA-enabled ``EinsumDense`` (Keras' ``kernel`` adds ``A·B``)."""
    return layer._kernel


def add_weight_after_build(layer, name: str, shape: tuple, initializer) -> None:
    """Add a trainable float32 weight ``name`` to a built layer, as Keras' own ``enable_lora`` does
    (a built layer's variable tracker is locked); never autocast, so it keeps float32 under a
    mixed-precision policy."""
    layer._tracker.unlock()
    try:
        variable = layer.add_weight(
            name=name, shape=shape, initializer=initializer, dtype="float32", autocast=False
        )
    finally:
        layer._tracker.lock()
    setattr(layer, name, variable)


def low_rank_product(xa, b):
    """``xa · b`` for ``xa`` of shape ``(..., r)`` and ``b`` of ``(r, out)``, as one 2-D matmul when
    the shape is known."""

    lead = tuple(xa.shape[:-1])
    if any(d is None for d in lead):  # symbolic shape inference only
        return keras.ops.matmul(xa, b)
    return keras.ops.reshape(
        keras.ops.matmul(keras.ops.reshape(xa, (-1, b.shape[0])), b), (*lead, b.shape[-1])
    )


def text_inputs(backbone, token_ids, padding_mask) -> dict:
    """The inputs ``backbone`` takes for text rows.

    Gemma 4's also takes ``position_ids`` (0, 1, … in every row, as its preprocessor makes them);
    a multimodal Gemma 4 (keras-hub's E2B and E4B presets) also takes image and audio inputs, given
    here empty, as its preprocessor does for a prompt without media. Gemma 2 and 3 take the two
    arrays only. An input not known here is refused, naming it (a keras-hub release added it).
    """
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    wanted = set(backbone.input) - set(inputs)
    if not wanted:
        return inputs
    rows, width = ops.shape(token_ids)
    empty = {
        "position_ids": lambda: ops.broadcast_to(ops.arange(width, dtype="int32"), (rows, width)),
        "pixel_values": lambda: ops.zeros(
            (rows, 0, 1, 3 * backbone.vision_encoder.patch_size**2), "float32"
        ),
        "pixel_position_ids": lambda: ops.zeros((rows, 0, 1, 2), "int32"),
        "vision_indices": lambda: ops.zeros((rows, 0), "int32"),
        "vision_mask": lambda: ops.zeros((rows, width), "int32"),
        "audio_mel": lambda: ops.zeros(
            (rows, 0, 1, backbone.audio_encoder.input_feat_size), "float32"
        ),
        "audio_mel_mask": lambda: ops.zeros((rows, 0, 1), "int32"),
        "audio_indices": lambda: ops.zeros((rows, 0), "int32"),
        "audio_mask": lambda: ops.zeros((rows, width), "int32"),
    }
    unknown = wanted - set(empty)
    if unknown:
        raise RuntimeError(
            f"compat.text_inputs: {type(backbone).__name__} takes {sorted(unknown)}, unknown to "
            "this series; this keras-hub release changed its inputs."
        )
    inputs = {k: ops.convert_to_tensor(v) for k, v in inputs.items()}
    return {**inputs, **{name: empty[name]() for name in wanted}}


def cached_forward(lm, token_ids, caches, index, key_mask, layout: str):
    """Hidden states (before the output layer) of ``token_ids`` at positions ``index…``, and the
    updated caches.

    What keras-hub's ``call_with_cache`` computes plus ``key_mask`` ``(rows, cache length)``,
    which masks padding as attention keys; the decoder blocks take it as their ``padding_mask``
    (keras-hub's own Gemma 2/3 decode steps pass none: they pad prompts on the right only).
    Gemma 4's ``call_with_cache`` (layout ``"model"``) takes the mask itself, and adds what its
    blocks need (per-layer embeddings, shared key/values); its unused logits are dropped by XLA.
    """

    if layout == "model":
        _, hidden, caches = lm.call_with_cache(token_ids, caches, index, padding_mask=key_mask)
        return hidden, caches
    backbone = lm.backbone
    x = backbone.token_embedding(token_ids)
    x = x * ops.cast(ops.sqrt(backbone.hidden_dim), x.dtype)
    updated = []
    for layer, cache in zip(backbone.transformer_layers, caches):
        x, cache = layer(x, padding_mask=key_mask, cache=cache, cache_update_index=index)
        updated.append(cache)
    return backbone.layer_norm(x), tuple(updated)


def cache_layout(lm) -> str:
    """``"model"``, ``"pairs"`` or ``"stacked"``: how ``lm`` takes its key/value cache.

    keras-hub 0.32's Gemma 4 takes one ``(rows, layers, 2, length, heads, dim)`` array in a
    ``call_with_cache`` that masks padding keys (``"model"``). Its Gemma 3 decoder blocks take a
    ``(key, value)`` pair of ``(rows, length, heads, dim)`` arrays; its Gemma and Gemma 2 (and
    Gemma 3 in 0.26, the Kaggle image's) one ``(rows, 2, length, heads, dim)`` array. One call of
    the first block per layout, on abstract one-row values, tells which: exactly one must work (one
    row, so a stacked array cannot pass for a pair).
    """

    gemma4 = getattr(keras_hub.models, "Gemma4CausalLM", None)  # keras-hub 0.26 has none
    if gemma4 is not None and isinstance(lm, gemma4):
        return "model"
    b = lm.backbone
    x = jax.ShapeDtypeStruct((1, 1, b.hidden_dim), lm.compute_dtype)
    half = jax.ShapeDtypeStruct((1, 2, b.num_key_value_heads, b.head_dim), lm.compute_dtype)
    layouts = {
        "pairs": (half, half),
        "stacked": jax.ShapeDtypeStruct(
            (1, 2, 2, b.num_key_value_heads, b.head_dim), lm.compute_dtype
        ),
    }
    works = [name for name, cache in layouts.items() if _runs(b.transformer_layers[0], x, cache)]
    if len(works) != 1:
        raise RuntimeError(
            f"compat.cache_layout: {type(b.transformer_layers[0]).__name__} takes {works or 'neither'} of "
            "keras-hub's known cache layouts; this keras-hub release changed it."
        )
    return works[0]


def _runs(layer, x, cache) -> bool:
    """Whether the decoder block ``layer`` accepts ``cache`` (abstract shapes only, nothing
    computed)."""

    try:
        jax.eval_shape(lambda x, c: layer(x, cache=c, cache_update_index=0), x, cache)
        return True
    except (AttributeError, IndexError, TypeError, ValueError):
        return False


def empty_caches(lm, rows: int, length: int, layout: str):
    """Zero key/value caches in ``layout`` (see :func:`cache_layout`): one array for ``"model"``
    (heads as wide as the widest layer's), else one per decoder layer."""

    b = lm.backbone
    if layout == "model":
        dim = max(b.head_dim, getattr(b, "global_head_dim", None) or 0)
        shape = (rows, b.num_layers, 2, length, b.num_key_value_heads, dim)
        return ops.zeros(shape, lm.compute_dtype)
    shape = (rows, length, b.num_key_value_heads, b.head_dim)
    if layout == "pairs":
        return tuple(
            (ops.zeros(shape, lm.compute_dtype), ops.zeros(shape, lm.compute_dtype))
            for _ in range(b.num_layers)
        )
    return tuple(ops.zeros((rows, 2, *shape[1:]), lm.compute_dtype) for _ in range(b.num_layers))


def kaggle_preset_cached(kaggle_handle: str) -> bool:
    """Whether a Kaggle model handle ``owner/model/framework/variation/version`` is in kagglehub's
    local cache."""
    from kagglehub import cache, handle

    # unversioned: kagglehub must ask the server for the latest version
    if kaggle_handle.count("/") != 4:
        return False
    folder = cache.get_cached_path(handle.parse_model_handle(kaggle_handle))
    return os.path.isdir(folder) and bool(os.listdir(folder))


def chrf_statistics(hypothesis: str, reference: str) -> list[float]:
    """sacrebleu's chrF sufficient statistics of one sentence pair (summed over a corpus for corpus
    chrF)."""
    return [float(x) for x in _chrf()._extract_corpus_statistics([hypothesis], [[reference]])[0]]


def chrf_from_statistics(stats: list[float]) -> float:
    """Corpus chrF (0-100) from summed statistics, exactly as ``CHRF().corpus_score`` computes
    it."""
    return float(_chrf()._compute_score_from_stats(list(stats)).score)


_CHRF = None


def _chrf():
    """One shared sacrebleu CHRF metric (default settings: chrF, character n-grams up to 6, beta
    2)."""
    global _CHRF
    if _CHRF is None:
        from sacrebleu.metrics import CHRF

        _CHRF = CHRF()
    return _CHRF

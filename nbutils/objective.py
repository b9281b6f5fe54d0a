"""The objective: next-token cross-entropy at the scored (response) positions only.

Training (:class:`nbutils.training.Trainer`) and the teacher-forced evaluation loss
(:func:`nbutils.evaluation.response_losses`) both call :func:`scored_nll`, so they cannot disagree.
The 262k-word output layer dominates a step, so :func:`output_nll` runs it once, on the scored
entries actually present (rounded up to ``HEAD_STEP``), and forms its gradient in the forward pass.
"""

from __future__ import annotations

HEAD_STEP = 16  # the output layer runs on a multiple of this many scored entries
HEAD_SIZES = 8  # at most this many sizes compiled into each step (one is picked at run time)


def scored_nll(backbone, trainable: list, non_trainable: list, inputs: dict):
    """Cross-entropy ``(rows, scored)`` of each scored position's next token (0 where ``weights`` is 0), computed statelessly.

    ``inputs`` holds ``token_ids``/``padding_mask`` ``(rows, width)`` and ``positions``/``targets``/``weights``
    ``(rows, scored)`` (see :class:`nbutils.batches.Batch`). The output layer (the tied embedding in
    reverse, with the model's own final soft-cap) runs only at the scored positions.
    """
    import keras

    mapping = list(zip(backbone.trainable_variables, trainable)) + list(zip(backbone.non_trainable_variables, non_trainable))
    with keras.StatelessScope(state_mapping=mapping):
        hidden = backbone({"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]})
        head_values = [v.value for v in backbone.token_embedding.variables]
    picked = keras.ops.take_along_axis(hidden, inputs["positions"][..., None], axis=1)
    return output_nll(backbone.token_embedding, head_values, picked, inputs["targets"], inputs["weights"])


def output_nll(layer, values: list, hidden, targets, weights):
    """Cross-entropy of ``layer(hidden, reverse=True)`` at ``targets`` ``(rows, scored)``, 0 where ``weights`` is 0.

    The entries with weight move to the front and the layer runs on the first ``k`` of them, ``k`` the
    smallest of a few compiled sizes that holds them all (``lax.switch``): one shape per batch shape,
    whatever its response tokens, and no work on padding. ``values`` are ``layer``'s variables' values.
    """
    import jax
    import jax.numpy as jnp

    rows, scored, dim = hidden.shape
    n, sizes = rows * scored, head_sizes(rows * scored)
    step = sizes[0]
    order = jnp.argsort(weights.reshape(-1) <= 0, stable=True)  # weighted entries first, in order
    h = jnp.pad(hidden.reshape(n, dim)[order], ((0, sizes[-1] - n), (0, 0)))
    t = jnp.pad(targets.reshape(-1)[order], (0, sizes[-1] - n))
    nll_of = _nll_with_gradient(layer)
    branches = [lambda h, t, v, k=k: jnp.pad(nll_of(h[:k], t[:k], v), (0, sizes[-1] - k)) for k in sizes]
    which = jnp.clip(-(-jnp.sum(weights > 0) // step) - 1, 0, len(sizes) - 1)
    nll = jnp.zeros(n, jnp.float32).at[order].set(jax.lax.switch(which, branches, h, t, values)[:n])
    return jnp.where(weights > 0, nll.reshape(rows, scored), 0.0)


def head_sizes(entries: int) -> list[int]:
    """The sizes the output layer is compiled at in a step of ``entries`` (rows × scored) entries."""
    step = max(HEAD_STEP, -(-entries // HEAD_SIZES // HEAD_STEP) * HEAD_STEP)
    return list(range(step, -(-entries // step) * step + 1, step))


def head_size(entries: int, weighted: int) -> int:
    """The entries the output layer runs on in a step of ``entries`` entries of which ``weighted`` are scored."""
    return next((k for k in head_sizes(entries) if k >= weighted), head_sizes(entries)[-1])


def _nll_with_gradient(layer):
    """``nll(hidden, targets, values)`` of ``layer`` whose backward pass reuses d nll/d hidden formed in the forward.

    Each entry's loss depends on its own hidden vector only, so that gradient is one ``(entries, dim)``
    array, and no ``(entries, vocabulary)`` logits are kept for the backward pass.
    Only ``hidden`` gets a gradient, so a trainable layer (no LoRA: full fine-tuning) gets the plain function.
    """
    import jax
    import jax.numpy as jnp
    import keras

    def plain(hidden, targets, values):
        with keras.StatelessScope(state_mapping=list(zip(layer.variables, values))):
            logits = keras.ops.cast(layer(hidden, reverse=True), "float32")
        return keras.ops.sparse_categorical_crossentropy(targets, logits, from_logits=True)

    def forward(hidden, targets, values):
        nll, pullback = jax.vjp(lambda x: plain(x, targets, values), hidden)
        return nll, pullback(jnp.ones_like(nll))[0]

    def backward(d_hidden, g):
        return g[:, None].astype(d_hidden.dtype) * d_hidden, None, None

    if any(v.trainable for v in layer.variables):
        return plain
    nll = jax.custom_vjp(plain)
    nll.defvjp(forward, backward)
    return nll


def variable_values(backbone) -> tuple[list, list]:
    """Current values of the backbone's trainable and non-trainable variables."""
    return [v.value for v in backbone.trainable_variables], [v.value for v in backbone.non_trainable_variables]

"""The objective: next-token cross-entropy at the scored (response) positions only.

Training (:class:`nbutils.training.Trainer`, through :func:`scored_nll`) and the teacher-forced
evaluation loss (scored in generation's prefill, :mod:`nbutils.decoding`) both call
:func:`output_nll`: the same loss of the hidden states.
The 262k-word output layer dominates a step, so :func:`output_nll` runs it once, on the scored
entries actually present (rounded up to one of a few sizes), and forms its gradient in the forward
pass.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import keras

from nbutils import compat, devices

HEAD_STEP = 16  # the output layer runs on a multiple of this many scored entries
HEAD_SIZES = 8  # at most this many sizes compiled into each step (one is picked at run time)


def scored_nll(backbone, trainable: list, non_trainable: list, inputs: dict, gradient: bool = True):
    """Cross-entropy ``(rows, scored)`` of each scored position's next token (0 where unweighted),
    computed statelessly; ``gradient=False`` when none will be taken (evaluation).

    ``inputs`` holds ``token_ids``/``padding_mask`` ``(rows, width)`` and
    ``positions``/``targets``/``weights`` ``(rows, scored)`` (see :class:`nbutils.batches.Batch`).
    The output layer (the tied embedding in reverse, with the model's own final soft-cap) runs only
    at the scored positions.
    """

    mapping = list(zip(backbone.trainable_variables, trainable)) + list(
        zip(backbone.non_trainable_variables, non_trainable)
    )
    with keras.StatelessScope(state_mapping=mapping):
        hidden = backbone(compat.text_inputs(backbone, inputs["token_ids"], inputs["padding_mask"]))
        head_values = [v.value for v in backbone.token_embedding.variables]
    picked = keras.ops.take_along_axis(hidden, inputs["positions"][..., None], axis=1)
    groups = devices.data_shards(picked.shape[0])  # each device compacts and scores its own rows
    layer = backbone.token_embedding
    return output_nll(
        layer, head_values, picked, inputs["targets"], inputs["weights"], groups, gradient
    )


def output_nll(
    layer, values: list, hidden, targets, weights, groups: int = 1, gradient: bool = True
):
    """Cross-entropy of ``layer(hidden, reverse=True)`` at ``targets`` ``(rows, scored)``, 0 where
    ``weights`` is 0.

    In each of ``groups`` equal blocks of rows the weighted entries move to the front, and the layer
    runs on the first ``k`` entries of every block, ``k`` the smallest of a few compiled sizes that
    holds them (``lax.switch``): one shape per batch shape whatever its response tokens, no work on
    padding, and blocks stay on the device holding their rows. ``values``: ``layer``'s variables'
    values; ``gradient=False``: none will be taken, so a trainable layer runs as a frozen one.
    """

    rows, scored, dim = hidden.shape
    m = rows // groups * scored  # entries per block
    # no gradient for the layer's own weights (else: plain autodiff, one size, see below): LoRA
    # freezes them, and evaluation (``gradient=False``) takes none
    frozen = not gradient or not any(v.trainable for v in layer.variables)
    # Several sizes pay on the CPU only: an accelerator would compile every branch and read the
    # branch index back to the host each step, for a matmul it runs fast at full size anyway.
    # Autodiff through the branches would keep every branch's (entries, vocabulary) residuals.
    several = frozen and devices.backend() == "cpu"
    sizes = head_sizes(m) if several else head_sizes(m)[-1:]
    weighted = (weights > 0).reshape(groups, m)
    order = jnp.argsort(~weighted, axis=1, stable=True)  # weighted entries first, in order
    pad = ((0, 0), (0, sizes[-1] - m))
    h = jnp.pad(
        jnp.take_along_axis(hidden.reshape(groups, m, dim), order[..., None], axis=1),
        (*pad, (0, 0)),
    )
    t = jnp.pad(jnp.take_along_axis(targets.reshape(groups, m), order, axis=1), pad)
    nll_of = _nll_with_gradient(layer, frozen)
    branches = [
        lambda h, t, v, k=k: jnp.pad(nll_of(h[:, :k], t[:, :k], v), ((0, 0), (0, sizes[-1] - k)))
        for k in sizes
    ]
    if len(sizes) == 1:
        nll = branches[0](h, t, values)[:, :m]
    else:
        nll = jax.lax.switch(head_index(sizes, weighted.sum(1).max()), branches, h, t, values)
        nll = nll[:, :m]
    nll = jnp.take_along_axis(nll, jnp.argsort(order, axis=1), axis=1)  # back to each entry's place
    return jnp.where(weights > 0, nll.reshape(rows, scored), 0.0)


def head_sizes(entries: int) -> list[int]:
    """The sizes the output layer is compiled at in a step of ``entries`` (rows × scored)
    entries."""
    step = max(HEAD_STEP, -(-entries // HEAD_SIZES // HEAD_STEP) * HEAD_STEP)
    return list(range(step, -(-entries // step) * step + 1, step))


def head_index(sizes: list[int], weighted):
    """Which of ``sizes`` the output layer runs at for ``weighted`` scored entries: the first that
    holds them all (the largest when none does); traceable."""

    return jnp.minimum(jnp.searchsorted(jnp.asarray(sizes), weighted), len(sizes) - 1)


def head_size(entries: int, weighted: int) -> int:
    """The entries the output layer runs on in a step of ``entries`` entries of which ``weighted``
    are scored (``head_index``'s rule)."""
    sizes = head_sizes(entries)
    return sizes[int(head_index(sizes, weighted))]


def _nll_with_gradient(layer, frozen: bool) -> Callable:
    """``nll(hidden, targets, values)`` of ``layer`` whose backward pass reuses d nll/d hidden
    formed in the forward.

    Each entry's loss depends on its own hidden vector only, so that gradient is one ``(entries,
    dim)`` array, and no ``(entries, vocabulary)`` logits are kept for the backward pass. Only
    ``hidden`` gets a gradient, so a layer that is not ``frozen`` (no LoRA: full fine-tuning) gets
    the plain function.
    """

    def plain(hidden, targets, values):
        with keras.StatelessScope(state_mapping=list(zip(layer.variables, values))):
            logits = keras.ops.cast(layer(hidden, reverse=True), "float32")
        # log-sum-exp minus the target's logit: Keras' sparse cross-entropy multiplies a one-hot
        # of the whole vocabulary (see docs/design.md)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    def forward(hidden, targets, values):
        nll, pullback = jax.vjp(lambda x: plain(x, targets, values), hidden)
        return nll, pullback(jnp.ones_like(nll))[0]

    def backward(d_hidden, g):
        return (g[..., None] * d_hidden.astype(g.dtype)).astype(d_hidden.dtype), None, None

    if not frozen:
        return plain
    nll = jax.custom_vjp(plain)
    nll.defvjp(forward, backward)
    return nll


def variable_values(backbone) -> tuple[list, list]:
    """Current values of the backbone's trainable and non-trainable variables."""
    return [v.value for v in backbone.trainable_variables], [
        v.value for v in backbone.non_trainable_variables
    ]

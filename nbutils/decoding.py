"""Batched decoding with every prompt ending at one position, so all batches share two compiled
functions.

keras-hub's generate function pads prompts on the right, seeds its cache over the whole padded
length (prompt and answer positions), starts each batch at its shortest prompt (longer prompts are
then fed one token a step) and compiles once per length. Here the prompts of a call are left-padded
to end at one position ``end``: the cache is seeded in chunks of :data:`CHUNK` tokens, only chunks
holding prompt tokens, then keras-hub's own sampler decodes exactly ``max_new_tokens`` steps for
every row. Padding is masked as keys; a row's positions shift with its padding, which rotary
position embeddings do not see (attention scores depend on relative positions only), so the tokens
are keras-hub's up to floating-point rounding.

Given each row's reference (target ids), the prefill runs on through the reference too and scores
it, teacher-forced, from the same hidden states: the evaluation loss costs no second pass over the
prompts. Decoding then starts at ``end`` as before; each step writes its key/value over the
reference's before attending, and the causal mask hides the positions after it.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import jax
import keras
import keras_hub
import numpy as np
from keras import ops

from nbutils import batches, compat, devices, objective

CHUNK = 32  # prompt tokens seeded into the cache per call of the compiled prefill
BARRED = -1e9  # the logit of a token a row may not pick


def prompt_end(prompt_ids: list[list[int]]) -> int:
    """The position every prompt of a call ends at: the longest prompt, rounded up to
    :data:`CHUNK`."""
    return batches.round_up(max(len(p) for p in prompt_ids), CHUNK)


def left_padded(
    prompt_ids: list[list[int]], rows: int, end: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``(rows, length)`` with each prompt's last token at ``end - 1`` and the key mask
    (prompts and ``end`` on)."""
    token_ids = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), bool)
    mask[:, end:] = True  # generated tokens
    for row, ids in enumerate(prompt_ids):
        token_ids[row, end - len(ids) : end], mask[row, end - len(ids) : end] = ids, True
    return token_ids, mask


def teacher_forced(
    token_ids: np.ndarray, target_ids: list[list[int]], end: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``token_ids`` with each row's targets from ``end`` on, each position's next token and
    whether that is a target (the positions a reference is scored at)."""
    full, weights = token_ids.copy(), np.zeros(token_ids.shape, np.float32)
    for row, ids in enumerate(target_ids):
        full[row, end : end + len(ids)] = ids
        weights[row, end - 1 : end - 1 + len(ids)] = 1.0
    return full, np.pad(full[:, 1:], ((0, 0), (0, 1))), weights


def steer(logits, prompt, index, end: int, stop_token_ids: list[int], min_new: int, beams: int):
    """Logits after two rules: the stop tokens are barred for the first ``min_new`` new tokens; with
    beam search, a beam that has stopped puts all its probability on a stop token, so it keeps its
    score and stays finished (keras-hub's ``BeamSampler`` would go on adding tokens to it)."""
    is_stop = np.isin(np.arange(logits.shape[-1]), stop_token_ids)
    if min_new:
        barred = ops.logical_and(is_stop[None], index - end < min_new)
        logits = ops.where(barred, BARRED, logits)
    if beams > 1:
        positions = ops.arange(prompt.shape[1])
        new = ops.logical_and(positions >= end, positions < index)[None]
        stopped = ops.any(ops.logical_and(_is_any(prompt, stop_token_ids), new), axis=1)
        logits = ops.where(stopped[:, None], ops.where(is_stop[None], 0.0, BARRED), logits)
    return logits


def _is_any(ids, values: list[int]):
    """Whether each entry of ``ids`` is one of ``values``."""
    hits = [ops.equal(ids, v) for v in values]
    out = hits[0]
    for hit in hits[1:]:
        out = ops.logical_or(out, hit)
    return out


def make_decoder(
    lm,
    sampler,
    batch_size: int,
    end: int,
    max_new_tokens: int,
    stop_token_ids: list[int],
    min_new_tokens: int = 0,
    max_target_tokens: int = 0,
) -> Callable[..., tuple[np.ndarray, np.ndarray | None]]:
    """``decode(prompt_ids, target_ids=None)`` → the ``(rows, max_new_tokens)`` tokens a keras-hub
    ``sampler`` picks after each of up to ``batch_size`` prompts, never a stop token among the
    first ``min_new_tokens``, and the cross-entropy ``(rows, positions)`` of each row's target ids
    (up to ``max_target_tokens``) after its prompt, teacher-forced (None without targets).

    Decoding ends early once every row has produced one of ``stop_token_ids``; steps not run leave 0
    (a row that stopped earlier keeps decoding until then: callers cut each row at its first stop
    token). A ``BeamSampler`` decodes ``num_beams`` copies of each row and returns the best.
    """

    if end <= 0 or end % CHUNK:
        raise ValueError(
            f"end={end}: prompts must end at a positive multiple of {CHUNK} (see prompt_end)."
        )
    # the cache holds the new tokens, and during the prefill the targets (in whole chunks)
    length = end + max(max_new_tokens, batches.round_up(max_target_tokens, CHUNK))
    layout = compat.cache_layout(lm)
    settings = (batch_size, end, length, max_new_tokens, tuple(stop_token_ids), min_new_tokens)
    # in the model's own __dict__ (not a Keras-tracked attribute): they go with the model
    steps = vars(lm).setdefault("_nbutils_decoder_steps", {})
    key = (_sampler_key(sampler), *settings)
    if key not in steps:
        steps[key] = _steps(lm, sampler, *settings, layout)
    prefill_fn, decode_fn = steps[key]

    def run(prompt_ids: list[list[int]], target_ids: list[list[int]] | None = None):
        """The new tokens of each prompt (at most ``batch_size`` prompts) and the cross-entropy of
        each target id."""
        if not 0 < len(prompt_ids) <= batch_size:
            raise ValueError(
                f"decode takes 1 to {batch_size} prompts (the decoder's batch_size), not {len(prompt_ids)}."
            )
        longest = max(len(p) for p in prompt_ids)
        if longest > end:
            raise ValueError(
                f"a prompt of {longest} tokens does not end by position {end}; make the decoder with prompt_end(all prompts)."
            )
        # unused rows repeat the last prompt: greedy, they stop when it does, so they never keep the
        # batch decoding
        token_ids, key_mask = left_padded(
            prompt_ids + prompt_ids[-1:] * (batch_size - len(prompt_ids)), batch_size, end, length
        )
        state = (
            [v.value for v in sampler.variables],
            [v.value for v in lm.trainable_variables],
            [v.value for v in lm.non_trainable_variables],
        )
        caches = compat.empty_caches(lm, batch_size, length, layout)
        scored = target_ids is not None and _check_targets(
            target_ids, prompt_ids, max_target_tokens
        )
        if scored:
            full, next_ids, weights = teacher_forced(token_ids, target_ids, end)
            # the last target is predicted at end - 2 + its length
            stop_at = end + batches.round_up(max(len(t) for t in target_ids) - 1, CHUNK)
        else:
            full, stop_at = token_ids, end
        nll = []
        # earlier chunks hold padding only
        for start in range((end - longest) // CHUNK * CHUNK, stop_at, CHUNK):
            chunk = slice(start, start + CHUNK)
            targets = (
                (next_ids[:, chunk], weights[:, chunk]) if scored and start >= end - CHUNK else ()
            )
            caches, out = prefill_fn(
                state, caches, full[:, chunk], key_mask, np.int32(start), *targets
            )
            nll += [] if out is None else [np.asarray(out)]
        new, sampler_values = decode_fn(state, caches, token_ids, key_mask)
        for variable, value in zip(sampler.variables, sampler_values):
            variable.assign(value)  # seeded samplers move on, as with keras-hub's generate
        rows = len(prompt_ids)
        if not scored:
            return np.asarray(new)[:rows], None
        return np.asarray(new)[:rows], np.concatenate(nll, axis=1)[:rows, CHUNK - 1 :]

    return run


def _sampler_key(sampler) -> tuple:
    """What a compiled decode loop depends on of ``sampler``: its class and configuration."""
    return type(sampler), json.dumps(sampler.get_config(), sort_keys=True, default=str)


def _steps(
    lm,
    sampler,
    batch_size: int,
    end: int,
    length: int,
    max_new_tokens: int,
    stop_token_ids: tuple[int, ...],
    min_new_tokens: int,
    layout: str,
) -> tuple[Callable, Callable]:
    """The jitted ``prefill(state, caches, token_ids, key_mask, start[, targets, weights])`` and
    ``decode(state, caches, token_ids, key_mask)`` of :func:`make_decoder`.

    Kept per model for each decoder shape and sampler, so a later decoder of the same kind (another
    call of generate; the base model with its adapter off) compiles nothing: the sampler's and the
    model's variable values are arguments.
    """
    backbone = lm.backbone
    beams = sampler.num_beams if isinstance(sampler, keras_hub.samplers.BeamSampler) else 1

    def scope(state):
        sampler_values, trainable, non_trainable = state
        mapping = [
            *zip(sampler.variables, sampler_values),
            *zip(lm.trainable_variables, trainable),
            *zip(lm.non_trainable_variables, non_trainable),
        ]
        return keras.StatelessScope(state_mapping=mapping)

    def prefill(state, caches, token_ids, key_mask, start, targets=None, weights=None):
        with scope(state):
            hidden, caches = compat.cached_forward(lm, token_ids, caches, start, key_mask, layout)
            head = [v.value for v in backbone.token_embedding.variables]
        if targets is None:
            return caches, None
        groups = devices.data_shards(hidden.shape[0])
        layer = backbone.token_embedding
        return caches, objective.output_nll(
            layer, head, hidden, targets, weights, groups, gradient=False
        )

    def decode(state, caches, token_ids, key_mask):
        beam_mask = ops.repeat(key_mask, beams, axis=0)  # as the BeamSampler repeats each row

        def next(prompt, cache, index):
            hidden, cache = compat.cached_forward(
                lm,
                ops.slice(prompt, [0, index - 1], [batch_size * beams, 1]),
                cache,
                index - 1,
                beam_mask,
                layout,
            )
            logits = backbone.token_embedding(hidden[:, 0], reverse=True)
            logits = steer(logits, prompt, index, end, stop_token_ids, min_new_tokens, beams)
            return logits, hidden[:, 0], cache

        # the sampler decodes until the end of its prompt array (the cache may hold more)
        token_ids = token_ids[:, : end + max_new_tokens]
        with scope(state) as s:
            out = sampler(
                next=next,
                prompt=token_ids,
                cache=caches,
                index=end,
                mask=ops.broadcast_to(ops.arange(token_ids.shape[1]) < end, token_ids.shape),
                stop_token_ids=tuple(stop_token_ids),
                model=lm,
            )
            values = [s.get_current_value(v) for v in sampler.variables]
        return out[:, end:], [v if v is not None else w for v, w in zip(values, state[0])]

    return jax.jit(prefill, donate_argnums=1), jax.jit(decode)


def _check_targets(target_ids: list[list[int]], prompt_ids: list[list[int]], room: int) -> bool:
    """Whether there are targets to score (one list per prompt, each fitting the decoder)."""
    if len(target_ids) != len(prompt_ids):
        raise ValueError(f"{len(target_ids)} target lists for {len(prompt_ids)} prompts.")
    longest = max(len(t) for t in target_ids)
    if longest > room:
        raise ValueError(
            f"a target of {longest} tokens; make the decoder with max_target_tokens >= {longest}."
        )
    return longest > 0

"""Checks of nbutils.decoding against keras-hub's own generate function, on tiny random models.

``tests/test_decoding.py`` runs them on the pinned stack; run as a script (by the same tests, with
the Kaggle image's keras-hub 0.26) they run on the tiny Gemma 3, whose cache layout differs there,
and print that layout as JSON.
"""

from __future__ import annotations

import json

import numpy as np

import nbutils  # noqa: F401  (JAX backend before Keras loads)
from nbutils import compat, decoding, evaluation, models

LENGTHS = (5, 40, 70)  # prompts in one, two and three chunks of 32, ending at 96


def tiny_gemma2():
    """A 2-layer random Gemma 2 (soft-caps, sliding window): keras-hub's stacked cache layout."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(1)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=1000,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=64,
        intermediate_dim=128,
        head_dim=32,
        query_head_dim_normalize=False,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        final_logit_soft_cap=30.0,
        attention_logit_soft_cap=50.0,
        use_sliding_window_attention=True,
        sliding_window_size=64,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def tiny_model(family: str):
    """A tiny random model: Gemma 3 with 6 layers (5 sliding-window, 1 global), Gemma 4 with 4
    (sliding and global in turn, per-layer embeddings) or Gemma 2."""
    if family == "gemma3":
        return models.tiny_gemma(sequence_length=64, num_layers=6)
    if family == "gemma4":
        return models.tiny_gemma4(sequence_length=64, num_layers=4)
    return tiny_gemma2()


def prompts_of(lengths, vocab: int) -> list[list[int]]:
    """Random prompts of the given lengths, each starting with ``<bos>`` (id 2)."""
    rng = np.random.default_rng(0)
    return [[2, *rng.integers(10, vocab, n - 1).tolist()] for n in lengths]


def keras_hub_tokens(lm, prompt: list[int], n: int) -> np.ndarray:
    """The ``n`` tokens keras-hub's own compiled generate function decodes after one unpadded prompt
    (no stop token)."""
    ids = np.zeros((1, len(prompt) + n), np.int32)
    ids[0, : len(prompt)] = prompt
    return np.asarray(
        lm.make_generate_function()({"token_ids": ids, "padding_mask": ids != 0})["token_ids"]
    )[0, len(prompt) :]


def first_stop(tokens, stops) -> int:
    """Index of the first token of ``tokens`` among ``stops`` (``len(tokens)`` if none)."""
    return next((k for k, t in enumerate(tokens) if t in stops), len(tokens))


def check_batch_matches_keras_hub(lm) -> None:
    """Prompts of 5, 40 and 70 tokens left-padded in one batch of 4 rows give keras-hub's greedy
    tokens per row; so do later batches."""
    vocab, n = lm.backbone.vocabulary_size, 12
    prompt_ids = prompts_of(LENGTHS, vocab)
    end = decoding.prompt_end(prompt_ids)
    assert end == 96, end
    decode = decoding.make_decoder(lm, evaluation.make_sampler("greedy"), 4, end, n, [vocab - 1])
    lm.compile(sampler=evaluation.make_sampler("greedy"))
    # then batches whose leading chunks hold padding only (skipped): 31 and 32 tokens of padding,
    # and 76
    for batch in (prompt_ids, prompts_of((65, 64), vocab), prompts_of((5, 20), vocab)):
        new = decode(batch)[0]
        assert new.shape == (len(batch), n), new.shape
        for row, prompt in enumerate(batch):
            np.testing.assert_array_equal(
                new[row], keras_hub_tokens(lm, prompt, n), err_msg=f"row of {len(prompt)} tokens"
            )


def reference_nll(lm, prompts: list[list[int]], targets: list[list[int]]) -> list[np.ndarray]:
    """Cross-entropy of each row's ``targets`` after its prompt: one compiled forward of the rows
    (right-padded), full logits, log-softmax."""
    rows = [p + t for p, t in zip(prompts, targets)]
    log_probs = np.asarray(reference_log_probs(lm)(*right_padded(rows, (len(rows), 128))))
    return [
        np.array([-log_probs[row, len(p) - 1 + k, t] for k, t in enumerate(target)])
        for row, (p, target) in enumerate(zip(prompts, targets))
    ]


def check_scored_prefill(lm) -> None:
    """With targets (1, 40 and 3 tokens: one and two chunks after the prompts), the prefill scores
    each as a plain forward pass does, and the new tokens are those decoded without targets (by
    :func:`check_beam_search`'s decoders: the same compiled steps)."""
    vocab, n = lm.backbone.vocabulary_size, 6
    prompt_ids = prompts_of(LENGTHS, vocab)
    targets = [t[1:] for t in prompts_of((2, 41, 4), vocab)]
    for spec in ("greedy", "beam:3"):
        sampler = evaluation.make_sampler(spec)
        plain, none = decoding.make_decoder(lm, sampler, 4, 96, n, [vocab - 1])(prompt_ids)
        decode = decoding.make_decoder(lm, sampler, 4, 96, n, [vocab - 1], max_target_tokens=40)
        new, nll = decode(prompt_ids, targets)
        assert none is None and nll.shape[0] == len(prompt_ids), nll.shape
        np.testing.assert_array_equal(new, plain, err_msg=spec)
    for row, expected in enumerate(reference_nll(lm, prompt_ids, targets)):
        np.testing.assert_allclose(nll[row, : len(expected)], expected, rtol=2e-4, atol=2e-4)
        assert (nll[row, len(expected) :] == 0).all()
    # the cache sized by the new tokens (more than the targets need): the same losses
    greedy = evaluation.make_sampler("greedy")
    _, short = decoding.make_decoder(lm, greedy, 4, 96, 40, [vocab - 1], max_target_tokens=4)(
        prompt_ids[:1], targets[:1]
    )
    np.testing.assert_allclose(short[0, :1], nll[0, :1], rtol=1e-5, atol=1e-5)


def check_early_stop(lm) -> None:
    """Rows stop on any stop id; decoding ends once the last row has stopped, also in a batch with
    unused rows."""
    vocab, n = lm.backbone.vocabulary_size, 12
    prompt_ids = prompts_of(LENGTHS[:2], vocab)
    plain = decoding.make_decoder(lm, evaluation.make_sampler("greedy"), 4, 64, n, [vocab - 1])(
        prompt_ids
    )[0]
    stops, ends = next(
        (s, e)
        for a in plain[0, 1:]
        for b in plain[1, 3:]
        for s in [{int(a), int(b)}]
        for e in [[first_stop(plain[r], s) for r in (0, 1)]]
        if 0 < e[0] < e[1] < n - 2
    )
    new = decoding.make_decoder(lm, evaluation.make_sampler("greedy"), 4, 64, n, sorted(stops))(
        prompt_ids
    )[0]
    np.testing.assert_array_equal(new[:, : ends[1] + 1], plain[:, : ends[1] + 1])
    assert (new[:, ends[1] + 1 :] == 0).all(), new  # the loop ended when the second row stopped
    stop = int(plain[0, ends[0]])
    assert evaluation.answer_tokens(new[0], stop) == (plain[0, : ends[0]].tolist(), True)
    assert evaluation.answer_tokens(plain[0], -1) == (plain[0].tolist(), False)


def check_seeded_sampling(lm) -> None:
    """top-k sampling draws what keras-hub's generate draws from the same seed, repeats with it, and
    moves on between batches."""
    prompt = prompts_of(LENGTHS[1:2], lm.backbone.vocabulary_size)
    decoders = [
        decoding.make_decoder(lm, evaluation.make_sampler("top_k:50", seed), 1, 64, 10, [1])
        for seed in (7, 7, 8)
    ]
    runs = [decode(prompt)[0][0] for decode in decoders]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert (runs[0] != runs[2]).any()
    assert (decoders[0](prompt)[0][0] != runs[0]).any()  # the seed generator's state moved on
    lm.compile(sampler=evaluation.make_sampler("top_k:50", 7))
    np.testing.assert_array_equal(runs[0], keras_hub_tokens(lm, prompt[0], 10))


def reference_log_probs(lm):
    """One compiled forward of the whole sequence: log-probabilities of the next token at every
    position of right-padded rows (a causal model reads them as unpadded)."""
    import jax
    import keras

    @jax.jit
    def log_probs(x, mask):
        hidden = lm.backbone(compat.text_inputs(lm.backbone, x, mask))
        logits = lm.backbone.token_embedding(hidden, reverse=True)
        return keras.ops.log_softmax(keras.ops.cast(logits, "float32"))

    return log_probs


def right_padded(rows: list[list[int]], shape: tuple[int, int]):
    """``rows`` left-aligned in a zero array of ``shape``, and their mask (rows past the last: the
    first row's)."""
    x = np.zeros(shape, np.int32)
    lengths = [len(r) for r in rows] + [len(rows[0])] * (shape[0] - len(rows))
    for i, row in enumerate(rows):
        x[i, : len(row)] = row
    return x, np.arange(shape[1])[None, :] < np.array(lengths)[:, None]


def reference_beam_search(log_probs, prompt: list[int], n: int, beams: int) -> list[int]:
    """Beam search by its definition, one prompt, every hypothesis recomputed from its first token
    each step (no cache, no left padding) by ``log_probs`` (:func:`reference_log_probs`): keep the
    ``beams`` highest sums of log-probabilities; the best after ``n`` tokens."""
    hypotheses = [(0.0, list(prompt))]
    for _ in range(n):
        last = len(hypotheses[0][1]) - 1
        x, mask = right_padded([ids for _, ids in hypotheses], (beams, len(prompt) + n))
        logp = np.asarray(log_probs(x, mask))[:, last]
        candidates = [
            (score + float(logp[row, t]), ids + [int(t)])
            for row, (score, ids) in enumerate(hypotheses)
            for t in np.argsort(-logp[row])[:beams]
        ]
        hypotheses = sorted(candidates, key=lambda c: -c[0])[:beams]
    return hypotheses[0][1][len(prompt) :]


def reference_greedy(log_probs, prompt: list[int], n: int, stops: list[int], min_new: int) -> list:
    """Greedy decoding by its definition, recomputed each step by ``log_probs``, with the stop
    tokens barred for the first ``min_new`` new tokens; the new tokens up to the first stop."""
    ids = list(prompt)
    for step in range(n):
        logp = np.array(log_probs(*right_padded([ids], (1, len(prompt) + n))))[0, len(ids) - 1]
        if step < min_new:
            logp[stops] = -np.inf
        ids.append(int(np.argmax(logp)))
        if ids[-1] in stops:
            break
    return ids[len(prompt) :]


def check_beam_search(lm) -> None:
    """Beam search (keras-hub's BeamSampler, 3 beams) over left-padded batches gives beam search's
    tokens by its definition per row (no stop token reached), and differs from greedy somewhere."""
    vocab, n = lm.backbone.vocabulary_size, 6
    prompt_ids = prompts_of(LENGTHS, vocab)
    beam = evaluation.make_sampler("beam:3")
    new = decoding.make_decoder(lm, beam, 4, 96, n, [vocab - 1])(prompt_ids)[0]
    greedy = decoding.make_decoder(lm, evaluation.make_sampler("greedy"), 4, 96, n, [vocab - 1])
    log_probs = reference_log_probs(lm)
    for row, prompt in enumerate(prompt_ids):
        np.testing.assert_array_equal(new[row], reference_beam_search(log_probs, prompt, n, 3))
    assert (new != greedy(prompt_ids)[0]).any()  # beams found another answer somewhere


def check_min_new_tokens(lm) -> None:
    """MIN_NEW_TOKENS=k decodes greedy's tokens by definition with the stops barred for k tokens.
    The stops are chosen so that one row would stop at new token k - 1 without the bar and does
    stop at token k with it: a bar one token short or one token long decodes otherwise."""
    vocab, n = lm.backbone.vocabulary_size, 12
    prompt_ids = prompts_of(LENGTHS[:2], vocab)
    greedy = evaluation.make_sampler("greedy")
    plain = decoding.make_decoder(lm, greedy, 2, 64, n, [vocab - 1])(prompt_ids)[0]
    k = 1 + next(j for j in range(3, n - 2) if plain[0, j] not in plain[0, :j])
    log_probs = reference_log_probs(lm)
    barred = reference_greedy(log_probs, prompt_ids[0], n, [int(plain[0, k - 1])], k)
    stops = sorted({int(plain[0, k - 1]), barred[k]})
    assert first_stop(plain[0], stops) == k - 1, "pick other prompts: a stop comes earlier"
    references = [reference_greedy(log_probs, prompt, n, stops, k) for prompt in prompt_ids]
    assert len(references[0]) == k + 1, "pick other prompts: row 0 must stop at token k"
    new = decoding.make_decoder(lm, greedy, 2, 64, n, stops, min_new_tokens=k)(prompt_ids)[0]
    for row, reference in enumerate(references):
        np.testing.assert_array_equal(new[row, : len(reference)], reference)


def check_forward(lm) -> str:
    """compat.cached_forward + the output layer gives call_with_cache's logits; returns the model's
    cache layout."""
    layout = compat.cache_layout(lm)
    ids = np.array(prompts_of([9], lm.backbone.vocabulary_size), np.int32)
    caches = compat.empty_caches(lm, 1, 16, layout)
    hidden, _ = compat.cached_forward(lm, ids, caches, 0, np.ones((1, 16), bool), layout)
    ours = lm.backbone.token_embedding(hidden, reverse=True)
    stacked = caches if layout != "stacked" else np.stack([np.asarray(c) for c in caches], axis=1)
    theirs, _, _ = lm.call_with_cache(ids, stacked, 0)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)
    return layout


CHECKS = (
    check_batch_matches_keras_hub,
    check_scored_prefill,
    check_early_stop,
    check_seeded_sampling,
    check_beam_search,
    check_min_new_tokens,
)

if __name__ == "__main__":
    lm = tiny_model("gemma3")
    for check in CHECKS:
        check(lm)
    print(json.dumps({"gemma3": check_forward(lm)}))

"""Batched decoding with left-padded prompts (nbutils.decoding) against keras-hub's own generate function."""

import numpy as np
import pytest

from nbutils import compat, decoding, evaluation, models

LENGTHS = (5, 40, 70)  # prompts in one, two and three chunks of 32, ending at 96


def tiny_gemma2():
    """A 2-layer random Gemma 2 (soft-caps, sliding window): keras-hub's other cache layout."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(1)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=1000, num_layers=2, num_query_heads=2, num_key_value_heads=1, hidden_dim=64,
        intermediate_dim=128, head_dim=32, query_head_dim_normalize=False, use_post_ffw_norm=True,
        use_post_attention_norm=True, final_logit_soft_cap=30.0, attention_logit_soft_cap=50.0,
        use_sliding_window_attention=True, sliding_window_size=64)  # fmt: skip
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


@pytest.fixture(scope="module", params=["gemma3", "gemma2"])
def lm(request):
    """A tiny random model of each cache layout."""
    return models.load_gemma("tiny", sequence_length=64) if request.param == "gemma3" else tiny_gemma2()


def prompts_of(lengths, vocab):
    rng = np.random.default_rng(0)
    return [[2, *rng.integers(10, vocab, n - 1).tolist()] for n in lengths]


def keras_hub_greedy(lm, prompt, n, stop=()):
    """What keras-hub's own compiled generate function decodes after one prompt (no padding)."""
    lm.compile(sampler=evaluation.make_sampler("greedy"))
    ids = np.zeros((1, len(prompt) + n), np.int32)
    ids[0, : len(prompt)] = prompt
    out = lm.make_generate_function()({"token_ids": ids, "padding_mask": ids != 0}, stop_token_ids=stop or None)
    return np.asarray(out["token_ids"])[0, len(prompt) :]


def test_left_padded_batch_decodes_what_keras_hub_decodes_per_row(lm):
    """Prompts of 5, 40 and 70 tokens left-padded in one batch of 4 rows (one empty) give keras-hub's tokens."""
    vocab, n = lm.backbone.vocabulary_size, 12
    prompt_ids = prompts_of(LENGTHS, vocab)
    end = decoding.prompt_end(prompt_ids)
    assert end == 96
    decode = decoding.make_decoder(lm, evaluation.make_sampler("greedy"), 4, end, n, [vocab - 1])
    new = decode(prompt_ids)
    assert new.shape == (3, n)
    for row, prompt in enumerate(prompt_ids):
        np.testing.assert_array_equal(new[row], keras_hub_greedy(lm, prompt, n), err_msg=f"row of {len(prompt)} tokens")
    np.testing.assert_array_equal(decode(prompt_ids[:1])[0], new[0])  # a batch of one row: the same tokens


def first_stop(tokens, stops) -> int:
    """Index of the first token of ``tokens`` among ``stops`` (len(tokens) if none)."""
    return next((k for k, t in enumerate(tokens) if t in stops), len(tokens))


def test_decoding_ends_once_every_row_has_stopped(lm):
    """Rows stop on any stop id; a stopped row decodes on until the last row stops, then nothing more is decoded."""
    vocab, n = lm.backbone.vocabulary_size, 12
    prompt_ids = prompts_of(LENGTHS[:2], vocab)
    plain = decoding.make_decoder(lm, evaluation.make_sampler("greedy"), 2, 64, n, [vocab - 1])(prompt_ids)
    stops, ends = next((s, e) for a in plain[0, 1:] for b in plain[1, 3:] for s in [{int(a), int(b)}]
                       for e in [[first_stop(plain[r], s) for r in (0, 1)]] if 0 < e[0] < e[1] < n - 2)  # fmt: skip
    new = decoding.make_decoder(lm, evaluation.make_sampler("greedy"), 2, 64, n, sorted(stops))(prompt_ids)
    np.testing.assert_array_equal(new[:, : ends[1] + 1], plain[:, : ends[1] + 1])
    assert (new[:, ends[1] + 1 :] == 0).all()  # the loop ended when the second row stopped
    stop = int(plain[0, ends[0]])
    assert evaluation.answer_tokens(new[0], stop) == (plain[0, : ends[0]].tolist(), True)
    assert evaluation.answer_tokens(plain[0], -1) == (plain[0].tolist(), False)


def test_seeded_sampling_matches_keras_hub_and_repeats(lm):
    """top-k sampling draws what keras-hub's generate draws from the same seed; a new decoder repeats it."""
    prompt = prompts_of(LENGTHS[1:2], lm.backbone.vocabulary_size)
    runs = [decoding.make_decoder(lm, evaluation.make_sampler("top_k:50", seed), 1, 64, 10, [1])(prompt)[0] for seed in (7, 7, 8)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert (runs[0] != runs[2]).any()
    lm.compile(sampler=evaluation.make_sampler("top_k:50", 7))
    ids = np.zeros((1, 50), np.int32)
    ids[0, :40] = prompt[0]
    stock = np.asarray(lm.make_generate_function()({"token_ids": ids, "padding_mask": ids != 0})["token_ids"])[0, 40:]
    np.testing.assert_array_equal(runs[0], stock)


def test_cache_layout_and_forward_match_call_with_cache(lm):
    """compat.cached_forward + the output layer gives call_with_cache's logits, in the layout the model takes."""
    import keras_hub

    pairs = isinstance(compat.empty_caches(lm, 1, 8)[0], tuple)
    assert pairs == isinstance(lm, keras_hub.models.Gemma3CausalLM), "keras-hub changed its cache layout: see compat.empty_caches"
    ids = np.array(prompts_of([9], lm.backbone.vocabulary_size), np.int32)
    caches = compat.empty_caches(lm, 1, 16)
    hidden, _ = compat.cached_forward(lm.backbone, ids, caches, 0, np.ones((1, 16), bool))
    ours = lm.backbone.token_embedding(hidden, reverse=True)
    stacked = caches if pairs else np.stack([np.asarray(c) for c in caches], axis=1)
    theirs, _, _ = lm.call_with_cache(ids, stacked, 0)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)

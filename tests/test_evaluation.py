"""Metrics, paired bootstrap, stop handling and the teacher-forced response loss."""

import numpy as np
import pytest

from nbutils import evaluation, prompts

ROWS = [
    {"id": "a", "instruction": "Summarize.", "input": "def f(x):\n    return x + 1", "output": "Add one to x."},
    {"id": "b", "instruction": "Summarize.", "input": "def g():\n    pass", "output": "Do nothing at all."},
    {"id": "c", "instruction": "Name a colour.", "input": "", "output": "Blue."},
]


def pred(i, ref, hyp, stopped=True, n=3):
    return {"id": str(i), "reference": ref, "prediction": hyp, "stopped": stopped, "n_tokens": n}


def test_scores_of_known_strings():
    s = evaluation.score_rows([pred(0, "Return the sum of a and b.", "return the sum of A and B"),
                               pred(1, "Open the file.", "Close the socket now", stopped=False, n=9)])  # fmt: skip
    assert s[0]["exact_match"] == 1.0 and s[0]["rougeL_f1"] == pytest.approx(1.0)
    assert s[1]["exact_match"] == 0.0 and 0 < s[1]["rougeL_f1"] < 0.5 and s[1]["chrf"] < s[0]["chrf"]
    agg = evaluation.aggregate(s)
    assert agg["stop_rate"] == 0.5 and agg["mean_tokens"] == 6.0


def test_bootstrap_of_identical_systems_is_zero():
    s = evaluation.score_rows([pred(i, f"value {i}", f"value {i % 3}") for i in range(30)])
    cmp = evaluation.paired_bootstrap(s, s, 300, seed=1)
    for v in cmp.values():
        assert v["diff"] == 0 and v["ci95"] == [0.0, 0.0]


def test_bootstrap_detects_a_real_gain_and_brackets_the_difference():
    refs = [f"compute the checksum of block {i}" for i in range(40)]
    base = evaluation.score_rows([pred(i, r, "something unrelated") for i, r in enumerate(refs)])
    tuned = evaluation.score_rows([pred(i, r, r if i % 4 else "checksum") for i, r in enumerate(refs)])
    cmp = evaluation.paired_bootstrap(base, tuned, 500, seed=0)
    assert cmp["rougeL_f1"]["ci95"][0] > 0.5
    for v in cmp.values():
        assert v["ci95"][0] <= v["diff"] <= v["ci95"][1]


def test_bootstrap_refuses_unpaired_rows():
    a = evaluation.score_rows([pred(0, "x y z", "x")])
    b = evaluation.score_rows([pred(1, "x y z", "x")])
    with pytest.raises(ValueError, match="same test rows"):
        evaluation.paired_bootstrap(a, b, 10)


def test_answer_tokens_stop_and_cap():
    ids = np.array([2, 10, 11, 50, 51, 106, 0, 0])
    mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)
    assert evaluation.answer_tokens(ids, mask, 3, 106, 10) == ([50, 51], True)
    assert evaluation.answer_tokens(ids, mask, 3, 106, 2) == ([50, 51], False)  # cap reached before the stop
    assert evaluation.answer_tokens(ids, mask, 3, 1, 10) == ([50, 51, 106], False)


def test_sampler_spec():
    import keras_hub

    assert isinstance(evaluation.make_sampler("top_k:5", 1), keras_hub.samplers.TopKSampler)
    assert isinstance(evaluation.make_sampler("top_p:0.8", 1), keras_hub.samplers.TopPSampler)
    with pytest.raises(ValueError, match="SAMPLER='beam'"):
        evaluation.make_sampler("beam")


def test_generation_records_tokens_and_stop(tiny_lm):
    preds = evaluation.generate(tiny_lm, ROWS, "gemma", max_new_tokens=5, batch_size=2, progress=False)
    assert [p["id"] for p in preds] == ["a", "b", "c"]
    for p in preds:
        assert 0 <= p["n_tokens"] <= 5 and p["prompt"] == prompts.render_prompt(ROWS[["a", "b", "c"].index(p["id"])])
        assert p["stopped"] or p["n_tokens"] == 5


def test_response_loss_matches_a_direct_computation(tiny_lm):
    """Loss over response tokens only, checked against a plain full-logits computation."""
    import keras

    losses = evaluation.response_losses(tiny_lm, ROWS, "gemma", 64, batch_size=2)
    tok = tiny_lm.preprocessor.tokenizer
    for row, got in zip(ROWS, losses):
        p, t = prompts.encode_example(tok, row, "gemma")
        ids = np.array([p + t])
        hidden = tiny_lm.backbone({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)})
        logp = np.asarray(keras.ops.log_softmax(tiny_lm.backbone.token_embedding(hidden, reverse=True), axis=-1))[0]
        expected = -sum(logp[len(p) - 1 + k, t[k]] for k in range(len(t)))
        assert got["loss_tokens"] == len(t)
        assert got["loss_sum"] == pytest.approx(expected, rel=1e-4)

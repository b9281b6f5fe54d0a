"""Metrics, paired bootstrap, stop handling and the teacher-forced response loss."""

import numpy as np
import pytest

from nbutils import evaluation, prompts, sequences

ROWS = [
    {
        "id": "a",
        "instruction": "Summarize.",
        "input": "def f(x):\n    return x + 1",
        "output": "Add one to x.",
    },
    {
        "id": "b",
        "instruction": "Summarize.",
        "input": "def g():\n    pass",
        "output": "Do nothing at all.",
    },
    {"id": "c", "instruction": "Name a colour.", "input": "", "output": "Blue."},
]


def pred(i, ref, hyp, stopped=True, n=3):
    return {"id": str(i), "reference": ref, "prediction": hyp, "stopped": stopped, "n_tokens": n}


def test_scores_of_known_strings():
    s = evaluation.score_rows(
        [
            pred(0, "Return the sum of a and b.", "return the sum of A and B"),
            pred(1, "Open the file.", "Close the socket now", stopped=False, n=9),
        ]
    )
    assert s[0]["exact_match"] == 1.0 and s[0]["rougeL_f1"] == pytest.approx(1.0)
    assert s[1]["exact_match"] == 0.0 and 0 < s[1]["rougeL_f1"] < 0.5
    agg = evaluation.aggregate(s)
    assert agg["stop_rate"] == 0.5 and agg["mean_tokens"] == 6.0


def test_chrf_is_sacrebleus_corpus_chrf():
    """Not the mean of sentence scores: character n-gram statistics summed over the corpus, as
    sacrebleu does."""
    from sacrebleu.metrics import CHRF

    refs = ["Return the sum of a and b.", "Open the file for reading.", "Close the socket.", "x"]
    hyps = ["return the sum", "Open a file", "Shut the connection down now", "y z"]
    s = evaluation.score_rows([pred(i, r, h) for i, (r, h) in enumerate(zip(refs, hyps))])
    corpus = CHRF().corpus_score(hyps, [refs]).score / 100
    sentence_mean = np.mean([CHRF().sentence_score(h, [r]).score / 100 for h, r in zip(hyps, refs)])
    assert evaluation.aggregate(s)["chrf"] == pytest.approx(corpus, abs=1e-9)
    # the two differ on this data, so the test tells them apart
    assert abs(corpus - sentence_mean) > 1e-3
    idx = np.array([0, 0, 2])
    assert evaluation.aggregate(s, idx)["chrf"] == pytest.approx(
        CHRF().corpus_score([hyps[i] for i in idx], [[refs[i] for i in idx]]).score / 100, abs=1e-9
    )


def test_cluster_bootstrap_is_wider_when_rows_in_a_group_move_together():
    """20 groups of 10 rows; the tuned model wins whole groups or loses them: rows are not
    independent."""
    refs = [f"compute the checksum of block {i}" for i in range(200)]
    groups = [f"m{i // 10}" for i in range(200)]
    base = evaluation.score_rows([pred(i, r, "something unrelated") for i, r in enumerate(refs)])
    tuned = evaluation.score_rows(
        [pred(i, r, r if (i // 10) % 2 else "unrelated") for i, r in enumerate(refs)]
    )
    cmp = evaluation.paired_bootstrap(base, tuned, 400, seed=0, groups=groups)["rougeL_f1"]
    width = lambda ci: ci[1] - ci[0]
    assert (
        cmp["ci95"] == cmp["ci95_clusters"]
        and "cluster bootstrap over 20 groups" == cmp["ci_method"]
    )
    assert width(cmp["ci95_clusters"]) > 2 * width(cmp["ci95_rows"])
    rows_only = evaluation.paired_bootstrap(base, tuned, 400, seed=0)["rougeL_f1"]
    assert rows_only["ci95"] == cmp["ci95_rows"] and "ci95_clusters" not in rows_only


def test_bootstrap_of_identical_systems_is_zero():
    s = evaluation.score_rows([pred(i, f"value {i}", f"value {i % 3}") for i in range(30)])
    cmp = evaluation.paired_bootstrap(s, s, 300, seed=1)
    for v in cmp.values():
        assert v["diff"] == 0 and v["ci95"] == [0.0, 0.0]
    groups = [str(i % 5) for i in range(30)]
    for v in evaluation.paired_bootstrap(s, s, 100, seed=1, groups=groups).values():
        assert v["ci95_clusters"] == [0.0, 0.0]


def test_bootstrap_detects_a_real_gain_and_brackets_the_difference():
    refs = [f"compute the checksum of block {i}" for i in range(40)]
    base = evaluation.score_rows([pred(i, r, "something unrelated") for i, r in enumerate(refs)])
    tuned = evaluation.score_rows(
        [pred(i, r, r if i % 4 else "checksum") for i, r in enumerate(refs)]
    )
    cmp = evaluation.paired_bootstrap(base, tuned, 500, seed=0)
    assert cmp["rougeL_f1"]["ci95"][0] > 0.5
    for v in cmp.values():
        assert v["ci95"][0] <= v["diff"] <= v["ci95"][1]


def test_bootstrap_refuses_unpaired_rows():
    a = evaluation.score_rows([pred(0, "x y z", "x")])
    b = evaluation.score_rows([pred(1, "x y z", "x")])
    with pytest.raises(ValueError, match="same test rows"):
        evaluation.paired_bootstrap(a, b, 10)


@pytest.mark.parametrize("vocab,block", [(1000, 512), (1024, 512), (37, 8), (5, 8)])
def test_first_argmax_is_argmax_with_its_tie_rule(vocab, block):
    """The blockwise argmax picks numpy's index everywhere: ties (first wins), -inf rows, NaN,
    padded vocabularies."""
    rng = np.random.default_rng(vocab)
    x = rng.integers(0, 4, (6, vocab)).astype(np.float32)  # many exact ties
    x[1] = -np.inf
    x[2, [vocab - 1, vocab // 2]] = 7.0  # two planted maxima (in different blocks for 1000 and 37)
    x[3, vocab // 3] = np.nan
    x[4] = rng.standard_normal(vocab).astype(np.float32)
    got = np.asarray(evaluation.first_argmax(x, block))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


def test_greedy_sampler_matches_keras_hubs(tiny_lm):
    """The default greedy sampler decodes exactly what keras-hub's own GreedySampler decodes."""
    import keras_hub

    token_ids = np.zeros((3, 24), np.int32)
    token_ids[0, :5], token_ids[1, :9], token_ids[2, :2] = 9, 11, 13
    outs = []
    for sampler in (keras_hub.samplers.GreedySampler(), evaluation.make_sampler("greedy")):
        tiny_lm.compile(sampler=sampler)
        outs.append(
            np.asarray(
                tiny_lm.make_generate_function()(
                    {"token_ids": token_ids, "padding_mask": token_ids != 0}
                )["token_ids"]
            )
        )
    assert isinstance(evaluation.make_sampler("greedy"), keras_hub.samplers.GreedySampler)
    np.testing.assert_array_equal(outs[1], outs[0])


def test_sampler_spec():
    import keras_hub

    assert isinstance(evaluation.make_sampler("top_k:5", 1), keras_hub.samplers.TopKSampler)
    assert isinstance(evaluation.make_sampler("top_p:0.8", 1), keras_hub.samplers.TopPSampler)
    beam = evaluation.make_sampler("beam:3")
    assert isinstance(beam, keras_hub.samplers.BeamSampler) and beam.num_beams == 3
    assert evaluation.make_sampler("beam").num_beams == 4
    with pytest.raises(ValueError, match="SAMPLER='beam:1'"):
        evaluation.make_sampler("beam:1")


def test_generation_records_tokens_and_stop(tiny_lm):
    preds = evaluation.generate(
        tiny_lm, ROWS, "gemma", max_new_tokens=5, batch_size=2, progress=False
    )
    one_by_one = evaluation.generate(
        tiny_lm, ROWS, "gemma", max_new_tokens=5, batch_size=1, progress=False
    )
    # sorted into batches by length, each answer comes back to its own row
    assert preds == one_by_one
    assert [p["id"] for p in preds] == ["a", "b", "c"]
    for p in preds:
        assert 0 <= p["n_tokens"] <= 5 and p["prompt"] == prompts.render_prompt(
            ROWS[["a", "b", "c"].index(p["id"])]
        )
        assert p["stopped"] or p["n_tokens"] == 5


def test_response_loss_matches_a_direct_computation():
    """Loss over response tokens only, from generation's prefill, checked against a plain
    full-logits computation; the answers are generate's."""
    import keras

    from nbutils import models

    lm = models.load_gemma("tiny", sequence_length=64)
    embeddings = lm.backbone.token_embedding.embeddings
    # a random tiny model is nearly uniform: make per-token losses differ
    embeddings.assign(embeddings * 40.0)
    tiny_lm = lm
    settings = (3, 2, "greedy", 0, 0)  # max_new_tokens, batch_size, sampler, seed, min_new_tokens
    answers, losses = evaluation.answer_rows(tiny_lm, ROWS, "gemma", *settings, 64, progress=False)
    assert answers == evaluation.generate(tiny_lm, ROWS, "gemma", 3, 2, progress=False)
    tok = tiny_lm.preprocessor.tokenizer
    for row, got in zip(ROWS, losses):
        p, t = sequences.encode_example(tok, row, "gemma")
        ids = np.array([p + t])
        hidden = tiny_lm.backbone({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)})
        logp = np.asarray(
            keras.ops.log_softmax(tiny_lm.backbone.token_embedding(hidden, reverse=True), axis=-1)
        )[0]
        expected = -sum(logp[len(p) - 1 + k, t[k]] for k in range(len(t)))
        assert got["loss_tokens"] == len(t)
        assert got["loss_sum"] == pytest.approx(expected, rel=1e-4)

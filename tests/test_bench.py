"""The benchmark's own helpers (bench/train_throughput.py), which its figures rely on."""

import importlib.util

import numpy as np

from nbutils import evaluation, paths

_spec = importlib.util.spec_from_file_location("train_throughput", paths.REPO_ROOT / "bench" / "train_throughput.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_bench_budget_sampler_ends_each_row_after_its_budget_and_keeps_its_tokens(tiny_lm):
    """The benchmark's one-by-one arm: a row past its budget emits the stop token, so a batch stops when its last row is done."""
    stop, budget, length = 106, 6, 40
    token_ids = np.zeros((2, length), np.int32)
    token_ids[0, :5], token_ids[1, :12] = 9, 11  # prompts of 5 and 12 tokens
    runs = {}
    for name, sampler in (("plain", evaluation.make_sampler("greedy")), ("budget", bench.budget_sampler(budget))):
        tiny_lm.compile(sampler=sampler)
        out = tiny_lm.make_generate_function()({"token_ids": token_ids, "padding_mask": token_ids != 0}, stop_token_ids=[stop])
        runs[name] = np.asarray(out["token_ids"]), np.asarray(out["padding_mask"])
    (plain, _), (capped, mask) = runs["plain"], runs["budget"]
    for row, prompt_len in enumerate((5, 12)):
        end = prompt_len + budget
        assert stop not in plain[row, prompt_len:]  # the random model never stops by itself
        np.testing.assert_array_equal(capped[row, :end], plain[row, :end])  # the budget's tokens unchanged
        assert capped[row, end] == stop and mask[row, end] and not mask[row, end + 1 :].any()
    assert capped[:, 12 + budget + 1 :].max() == 0  # the loop ended after the last row's forced stop: nothing decoded past it

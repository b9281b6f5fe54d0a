"""The benchmark's own helpers (bench/train_throughput.py, bench/step_profile.py), which its figures
rely on."""

import importlib.util
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbutils import evaluation, paths


def _bench_module(name: str):
    """A script of bench/ as a module."""
    spec = importlib.util.spec_from_file_location(name, paths.REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench, step_profile = _bench_module("train_throughput"), _bench_module("step_profile")


def test_bench_budget_sampler_ends_each_row_after_its_budget_and_keeps_its_tokens(tiny_lm):
    """The benchmark's one-by-one arm: a row past its budget emits the stop token, so a batch stops
    when its last row is done."""
    stop, budget, length = 106, 6, 40
    token_ids = np.zeros((2, length), np.int32)
    token_ids[0, :5], token_ids[1, :12] = 9, 11  # prompts of 5 and 12 tokens
    runs = {}
    for name, sampler in (
        ("plain", evaluation.make_sampler("greedy")),
        ("budget", bench.budget_sampler(budget)),
    ):
        tiny_lm.compile(sampler=sampler)
        out = tiny_lm.make_generate_function()(
            {"token_ids": token_ids, "padding_mask": token_ids != 0}, stop_token_ids=[stop]
        )
        runs[name] = np.asarray(out["token_ids"]), np.asarray(out["padding_mask"])
    (plain, _), (capped, mask) = runs["plain"], runs["budget"]
    for row, prompt_len in enumerate((5, 12)):
        end = prompt_len + budget
        assert stop not in plain[row, prompt_len:]  # the random model never stops by itself
        # the budget's tokens unchanged
        np.testing.assert_array_equal(capped[row, :end], plain[row, :end])
        assert capped[row, end] == stop and mask[row, end] and not mask[row, end + 1 :].any()
    # the loop ended after the last row's forced stop: nothing decoded past it
    assert capped[:, 12 + budget + 1 :].max() == 0


def test_step_profile_counts_each_matmul_of_a_traced_step():
    """The profile's HLO reading: every dot's FLOPs (2·m·n·k), forward or backward, and each traced
    operation found by name."""
    m, k, n = 24, 40, 56
    step = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2), argnums=(0, 1)))
    w, x = jnp.ones((k, n)) / k, jnp.ones((m, k))
    compiled = step.lower(w, x).compile()
    ops = step_profile.hlo_operations(compiled.as_text())
    flops = {
        kind: sum(o["flops"] for o in ops.values() if o["kind"] == kind)
        for kind in ("matmul, forward", "matmul, backward")
    }
    # x·w; then g·wᵀ and xᵀ·g
    assert flops == {"matmul, forward": 2 * m * k * n, "matmul, backward": 2 * 2 * m * k * n}
    # each dot can be re-run alone as it was
    for op in (o for o in ops.values() if o["kind"].startswith("matmul")):
        (lhs, rhs, numbers), out = op["dot_args"][0], op["dots"].split("→ ")[1].split(" (")[0]
        assert str(list(jax.lax.dot_general(jnp.ones(lhs), jnp.ones(rhs), numbers).shape)) == out
        assert step_profile.alone_gflops(lhs, rhs, numbers, seconds=0.01) > 0
    jax.block_until_ready(step(w, x))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            jax.block_until_ready(step(w, x))
        traced = step_profile.traced_operations(tmp)
    module = step_profile.module_name(compiled.as_text())
    assert {op for mod, op, _, _ in traced if mod == module} <= set(ops)
    totals = step_profile.by_kind(traced, ops, module)
    assert totals["matmul, forward"][1] == 2 * m * k * n and totals["matmul, forward"][0] > 0
    with pytest.raises(RuntimeError, match="does not hold"):
        step_profile.by_kind([(module, "no_such_op", 0, 1)], ops, module)


def test_step_profile_counts_overlapping_operations_once():
    """Busy time: the union of the operations' intervals (the matmul-busy time bounds the peak
    share)."""
    assert (
        step_profile.busy_seconds(
            [(0, 10**9), (5 * 10**8, 2 * 10**9), (3 * 10**9, 4 * 10**9), (3 * 10**9, 35 * 10**8)]
        )
        == 3.0
    )
    # one inside another
    assert step_profile.busy_seconds([(0, 4 * 10**9), (10**9, 2 * 10**9)]) == 4.0
    assert step_profile.busy_seconds([]) == 0.0


def test_step_profile_reads_batched_dots_and_leaves_out_containers():
    """A batched matmul's FLOPs and dimension numbers; a conditional's own time is not added to the
    operations it runs."""
    b, m, k, n = 3, 8, 16, 24

    def f(w, x):
        y = jnp.einsum("bmk,bkn->bmn", x, w)
        return jax.lax.cond(y.sum() > 0, lambda v: jnp.sum(v**2), lambda v: jnp.sum(v), y)

    compiled = jax.jit(f).lower(jnp.ones((b, k, n)), jnp.ones((b, m, k))).compile()
    ops = step_profile.hlo_operations(compiled.as_text())
    (dot,) = [o for o in ops.values() if o["kind"].startswith("matmul")]
    assert dot["flops"] == 2 * b * m * k * n
    lhs, rhs, numbers = dot["dot_args"][0]
    assert jax.lax.dot_general(jnp.ones(lhs), jnp.ones(rhs), numbers).shape == (b, m, n)
    containers = [name for name, o in ops.items() if o["kind"] == "container"]
    assert containers, "the conditional should be one operation of its own"
    module = step_profile.module_name(compiled.as_text())
    totals = step_profile.by_kind(
        [(module, containers[0], 0, 10**9), (module, next(iter(ops)), 0, 10**9)], ops, module
    )
    assert sum(seconds for seconds, _ in totals.values()) == 1.0


def test_accelerator_check_runs_on_the_cpu_and_writes_its_table(tmp_path, capsys):
    check = _bench_module("accelerator_check")
    out = tmp_path / "check.json"
    # bf16 forced: the mixed-precision update runs beside the float32 one even on the CPU
    assert (
        check.main(["--model", "tiny", "--rows", "4", "--precision", "bf16", "--out", str(out)])
        == 0
    )
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["device"]["platform"] == "cpu" and result["policy"] == "mixed_bfloat16"
    assert 0 < result["loss_difference"] < 0.1 * result["update_fp32"]["loss"]
    assert result["merge_check"]["passed"] and result["decoding"]["tokens"] > 0
    assert "| merge check (highest precision) |" in table and "passed" in table

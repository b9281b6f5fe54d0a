"""DISTRIBUTION: data parallel and a 2x2 mesh give the step of one device; the layout map shards
what it says."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nbutils import devices

SCRIPT = Path(__file__).with_name("_distributed_step.py")


@pytest.fixture(scope="module")
def steps():
    """One update on 1 device, on a 4x1 data mesh and on a 2x2 mesh (4 host devices, one
    subprocess)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            *("none", "data", "model:2x2", "model:1x4"),
            *("gemma4/none", "gemma4/data", "gemma4/model:2x2"),
            *("variants/none", "variants/model:2x2"),
            "hidden-split",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        d["spec"]: d
        for d in map(json.loads, (l for l in done.stdout.splitlines() if l.startswith("{")))
    }


@pytest.mark.parametrize(
    "spec", ["data", "model:2x2", "gemma4/data", "gemma4/model:2x2", "variants/model:2x2"]
)
def test_distributed_step_equals_one_device(steps, spec):
    # fp32 sums in another order (per-device partial sums, then an all-reduce) change the loss by
    # ~1e-7 relative. Adam's step lr·g/(|g| + epsilon) amplifies such noise where |g| is near
    # epsilon (Keras' 1e-7: a gradient of 1e-7 sees its step moved by a sizeable share), so the
    # update runs with epsilon 1e-3, where the step stays smooth in g.
    one, many = steps[spec.replace("data", "none").replace("model:2x2", "none")], steps[spec]
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-5)
    for a, b in zip(one["adapter"], many["adapter"], strict=True):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-6)
    moved = [np.abs(np.array(a)).sum() for a in one["adapter"]]
    assert all(m > 0 for m in moved)  # the comparison is over real, updated matrices


def test_each_device_runs_the_output_layer_on_its_own_rows(steps):
    """Data parallel over 4 devices: each device's 262k-word matmul covers its quarter of the
    entries, not all."""
    assert steps["data"]["head_rows"] * 4 == steps["none"]["head_rows"] == 64  # 4 rows x 16 entries


def test_layout_map_shards_the_kernels(steps):
    shardings = steps["model:2x2"]["shardings"]
    assert shardings["token_embedding/embeddings"] == ["model"]
    # query and attention output by heads; the single key/value head replicated
    assert shardings["decoder_block_0/attention/query/kernel"] == ["model"]
    assert shardings["decoder_block_1/attention/key/kernel"] == []
    assert shardings["decoder_block_1/attention/attention_output/kernel"] == ["model"]
    assert shardings["decoder_block_0/ffw_gating_2/kernel"] == [None, "model"]
    assert shardings["decoder_block_1/ffw_linear/kernel"] == ["model"]
    # adapters and norms: replicated
    assert shardings["decoder_block_0/attention/query/lora_kernel_a"] == []
    assert shardings["final_normalization/scale"] == []
    assert steps["data"]["shardings"]["decoder_block_0/ffw_linear/kernel"] == []
    # rows split over devices
    assert steps["data"]["batch_axes"] == steps["model:2x2"]["batch_axes"] == ["batch"]
    # 3 rows over a data axis of 4 (data) or 2 (model:2x2): padded, then split, never replicated
    assert (steps["none"]["padded_rows"], steps["data"]["padded_rows"]) == (3, 4)
    assert steps["model:2x2"]["padded_rows"] == 4
    # the adapter lives on the mesh, not copied to one device
    assert steps["model:2x2"]["adapter_devices"] == 4


def test_gemma4_layout_shards_both_embedding_tables(steps):
    """Gemma 4 takes the same layout; its per-layer embedding table is split by vocabulary rows."""
    shardings = steps["gemma4/model:2x2"]["shardings"]
    assert shardings["token_embedding/embeddings"] == ["model"]
    assert shardings["per_layer_token_embedding/embeddings"] == ["model"]
    assert shardings["decoder_block_1/attention/query/kernel"] == ["model"]
    assert shardings["decoder_block_0/ffw_linear/kernel"] == ["model"]
    assert shardings["decoder_block_0/per_layer_input_gate/kernel"] == []


def test_heads_layout_needs_fewer_collectives_than_splitting_the_hidden_dimension(steps):
    """Why GEMMA_LAYOUT splits heads: the compiled update's collectives, against q/k/v split over
    the hidden (contracting) dimension, the same loss either way."""
    ours, rejected = steps["model:2x2"], steps["hidden-split"]
    assert ours["collectives"] * 2 <= rejected["collectives"], (
        ours["collectives"],
        rejected["collectives"],
    )
    assert rejected["loss"] == pytest.approx(ours["loss"], rel=1e-5)


def test_heads_that_do_not_divide_the_model_axis_are_refused_in_one_line(steps):
    error = steps["model:1x4"]["error"]  # the tiny model's 2 query heads over 4 devices
    assert "query heads must divide" in error and "\n" not in error


def test_distribution_values():
    assert (
        devices.parse_distribution("auto", 1) is None
        and devices.parse_distribution("none", 8) is None
    )
    assert devices.parse_distribution("auto", 8) == (8, 1) == devices.parse_distribution("data", 8)
    assert devices.parse_distribution("model:2x4", 8) == (2, 4)
    with pytest.raises(ValueError, match="needs 4 devices; JAX sees 8"):
        devices.parse_distribution("model:2x2", 8)
    with pytest.raises(ValueError, match="DISTRIBUTION='tensor'"):
        devices.parse_distribution("tensor", 8)

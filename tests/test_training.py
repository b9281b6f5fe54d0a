"""LoRA setup, masking/normalisation of the loss, training, and adapter save/load."""

import json

import keras
import numpy as np
import pytest

from nbutils import compat, evaluation, files, models, sequences, training

ROWS = [
    {
        "id": str(i),
        "instruction": "Summarize.",
        "input": f"def f{i}(x):\n    return x * {i}",
        "output": f"Multiply x by {i}.",
    }
    for i in range(12)
]


@pytest.fixture
def tiny():
    return models.load_gemma("tiny", sequence_length=64)


def adamw(cfg, n_train):
    """Notebook 03's optimizer."""
    import keras

    schedule = training.lr_schedule(cfg, training.plan(cfg, n_train)["updates"])
    return keras.optimizers.AdamW(
        learning_rate=schedule, weight_decay=cfg.weight_decay, global_clipnorm=cfg.clipnorm
    )


def test_lora_targets_and_alpha(tiny):
    s = training.enable_lora(tiny, 4, "all", alpha=16)
    enabled = [
        lyr for lyr in compat.all_layers(tiny.backbone) if getattr(lyr, "lora_enabled", False)
    ]
    assert len(enabled) == 2 * 7 and all(lyr.lora_alpha == 16 for lyr in enabled)
    assert {lyr.name for lyr in enabled} == set(training.LORA_TARGETS.values())
    assert s["trainable_params"] == sum(
        int(np.prod(v.shape)) for lyr in enabled for v in (lyr.lora_kernel_a, lyr.lora_kernel_b)
    )
    assert s["trainable_share_pct"] == pytest.approx(
        100 * s["trainable_params"] / s["total_params"]
    )
    with pytest.raises(ValueError, match="LORA_TARGETS='query,mlp'.*'attention' or 'all'"):
        training.lora_layer_names("query,mlp")


def test_alpha_scales_the_adapter_contribution(tiny):
    """Same adapter weights: doubling alpha doubles each LoRA layer's delta, and the backbone sees
    alpha."""
    tiny.backbone.enable_lora(4, target_layer_names=training.lora_layer_names("all"))
    layers = training.configure_lora(tiny.backbone, alpha=4.0, seed=1)
    rng = np.random.default_rng(0)
    for lyr in layers:
        lyr.lora_kernel_b.assign(rng.normal(size=lyr.lora_kernel_b.shape).astype("float32") * 0.1)
    probe = {
        "token_ids": np.array([[2, 100, 200, 300, 400]]),
        "padding_mask": np.ones((1, 5), bool),
    }
    layer = next(lyr for lyr in layers if lyr.name == "query")
    x = rng.normal(size=(1, 5, tiny.backbone.hidden_dim)).astype("float32")
    outputs = {}
    for alpha in (0.0, 4.0, 8.0):  # alpha 0: the frozen layer alone
        training.configure_lora(tiny.backbone, alpha=alpha, seed=1)
        outputs[alpha] = (np.asarray(layer(x)), np.asarray(tiny.backbone(probe)))
    frozen = outputs.pop(0.0)[0]
    outputs = {a: (y - frozen, h) for a, (y, h) in outputs.items()}
    np.testing.assert_allclose(outputs[8.0][0], 2 * outputs[4.0][0], rtol=1e-4, atol=1e-6)
    assert np.abs(outputs[4.0][0]).max() > 1e-3
    # the backbone output depends on alpha
    assert np.abs(outputs[8.0][1] - outputs[4.0][1]).max() > 1e-4


def test_arrays_mask_exactly_the_response(tokenizer):
    a = sequences.make_arrays(tokenizer, ROWS[:2], "gemma", 64)
    for i, row in enumerate(ROWS[:2]):
        p, t = sequences.encode_example(tokenizer, row, "gemma")
        assert a["token_ids"][i, : len(p) + len(t)].tolist() == p + t
        assert a["response_mask"][i].tolist() == [False] * len(p) + [True] * len(t) + [False] * (
            64 - len(p) - len(t)
        )
        assert a["token_ids"][i][a["response_mask"][i]][-1] == 1  # <eos>


def test_training_changes_only_the_adapter_and_lowers_loss(tiny, tmp_path):
    training.enable_lora(tiny, 8, "all", 16)
    frozen_before = {v.path: np.array(v) for v in tiny.backbone.non_trainable_weights}
    adapter_before = {v.path: np.array(v) for v in tiny.backbone.trainable_weights}
    # keyed by unique paths
    assert len(frozen_before) == len(tiny.backbone.non_trainable_weights) > 20
    assert all("lora" in p for p in adapter_before) and len(adapter_before) == 2 * 2 * 7
    cfg = training.TrainConfig(
        rank=8,
        targets="all",
        alpha=16,
        learning_rate=3e-3,
        warmup_steps=1,
        max_steps=12,
        eval_every=4,
        batch_size=4,
        patience=5,
    )
    loss_only = (1, 16, "greedy", 0, 0, 64)  # one new token: the answers are not looked at
    before = evaluation.answer_rows(tiny, ROWS, "gemma", *loss_only, progress=False)[1]
    result = training.train_lora(
        tiny, adamw(cfg, len(ROWS)), ROWS, ROWS[:4], cfg, "gemma", 64, tmp_path
    )
    after = evaluation.answer_rows(tiny, ROWS, "gemma", *loss_only, progress=False)[1]
    mean = lambda ls: sum(r["loss_sum"] for r in ls) / sum(r["loss_tokens"] for r in ls)
    assert mean(after) < mean(before) - 0.05, (mean(before), mean(after))
    frozen_after = {v.path: np.array(v) for v in tiny.backbone.non_trainable_weights}
    for (path, a), (path_after, b) in zip(frozen_before.items(), frozen_after.items(), strict=True):
        assert path == path_after and np.array_equal(a, b), path
    adapter_after = {v.path: np.array(v) for v in tiny.backbone.trainable_weights}
    # every A and B moved
    assert all(not np.array_equal(adapter_before[p], adapter_after[p]) for p in adapter_before)
    log = (tmp_path / "train_log.csv").read_text().splitlines()
    assert log[0] == ",".join(training.LOG_COLUMNS) and len(log) == 1 + result["updates_run"] == 13
    schedule = training.lr_schedule(cfg, 12)
    for k, line in enumerate(log[1:]):  # each row's learning rate is the one its update used
        assert float(line.split(",")[3]) == pytest.approx(float(schedule(k)), abs=1e-9)


def test_adapter_round_trip_and_mismatches(tiny, tmp_path):
    training.enable_lora(tiny, 4, "query,value", 8)
    for v in tiny.backbone.trainable_weights:
        v.assign(np.random.default_rng(0).normal(size=v.shape).astype("float32") * 0.05)
    cfg = training.TrainConfig(rank=4, targets="query,value", alpha=8)
    splits = {"train": "t", "val": "v", "test": "x"}
    path, spec_path = training.save_adapter(
        tiny, tmp_path / "a.lora.h5", training.adapter_spec(cfg, "tiny", "gemma", 64, splits)
    )
    probe = {"token_ids": np.array([[2, 100, 200, 300]]), "padding_mask": np.ones((1, 4), bool)}
    expected = np.asarray(tiny.backbone(probe))

    fresh = models.load_gemma("tiny", sequence_length=64)
    training.load_adapter(fresh, path, "tiny")
    np.testing.assert_allclose(np.asarray(fresh.backbone(probe)), expected, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="trained on model='tiny', not 'gemma3_270m_local'"):
        training.load_adapter(models.load_gemma("tiny"), path, "gemma3_270m_local")
    spec = json.loads(spec_path.read_text())
    spec_path.write_text(json.dumps({**spec, "rank": 8}))
    with pytest.raises(ValueError, match="holds 4 layers of rank 4, its spec \\(rank 8"):
        training.load_adapter(models.load_gemma("tiny"), path, "tiny")
    with pytest.raises(FileNotFoundError, match="run notebooks/03_lora_finetune.ipynb first"):
        training.load_adapter(models.load_gemma("tiny"), tmp_path / "missing.lora.h5", "tiny")


def test_gemma4_adapter_reloads_by_layer_path(tmp_path):
    """Adapters are keyed by layer path, not by keras-hub's layer index (keras-hub#2701): a freshly
    built tiny Gemma 4 with the adapter loaded computes what the trained one did."""
    lm = models.load_gemma("tiny-gemma4", sequence_length=64)
    training.enable_lora(lm, 4, "all", 8)
    rng = np.random.default_rng(0)
    for v in lm.backbone.trainable_weights:
        v.assign(rng.normal(size=v.shape).astype("float32") * 0.05)
    cfg = training.TrainConfig(rank=4, targets="all", alpha=8)
    spec = training.adapter_spec(cfg, "tiny-gemma4", "gemma4", 64, {"train": "t", "val": "v"})
    path, _ = training.save_adapter(lm, tmp_path / "g4.lora.h5", spec)
    stored = training.stored_adapter(path)
    assert sorted(stored) == sorted(layer.path for layer in training.lora_layers(lm.backbone))
    assert len(stored) == 2 * 7  # 2 blocks x (q, k, v, o, gate, up, down)
    ids = np.array([[2, 100, 200, 300, 400]])
    probe = compat.text_inputs(lm.backbone, ids, np.ones_like(ids, bool))
    expected = np.asarray(lm.backbone(probe))

    fresh = models.load_gemma("tiny-gemma4", sequence_length=64)
    assert not np.allclose(np.asarray(fresh.backbone(probe)), expected, atol=1e-3)
    training.load_adapter(fresh, path, "tiny-gemma4")
    np.testing.assert_array_equal(np.asarray(fresh.backbone(probe)), expected)


def test_adapter_written_by_keras_hub_still_loads(tiny, tmp_path):
    """Adapter files from before the path-keyed format (keras-hub's save_lora_weights) load."""
    training.enable_lora(tiny, 4, "query,value", 8)
    for v in tiny.backbone.trainable_weights:
        v.assign(np.random.default_rng(1).normal(size=v.shape).astype("float32") * 0.05)
    cfg = training.TrainConfig(rank=4, targets="query,value", alpha=8)
    spec = training.adapter_spec(cfg, "tiny", "gemma", 64, {"train": "t", "val": "v"})
    path = tmp_path / "old.lora.h5"
    tiny.backbone.save_lora_weights(str(path))
    files.write_json(tmp_path / "old.json", spec)
    ids = np.array([[2, 100, 200, 300]])
    probe = {"token_ids": ids, "padding_mask": ids > 0}
    fresh = models.load_gemma("tiny", sequence_length=64)
    training.load_adapter(fresh, path, "tiny")
    np.testing.assert_array_equal(
        np.asarray(fresh.backbone(probe)), np.asarray(tiny.backbone(probe))
    )


def test_adapter_off_computes_the_base_model_and_restores_the_adapter():
    base = models.load_gemma("tiny-gemma4", sequence_length=32)
    ids = np.array([[2, 100, 200, 300]])
    probe = compat.text_inputs(base.backbone, ids, ids > 0)
    expected = np.asarray(base.backbone(probe))
    tuned = models.load_gemma("tiny-gemma4", sequence_length=32)
    training.enable_lora(tuned, 2, "all", 4)
    for layer in training.lora_layers(tuned.backbone):
        layer.lora_kernel_b.assign(np.full(layer.lora_kernel_b.shape, 0.05, "float32"))
    with_adapter = np.asarray(tuned.backbone(probe))
    with training.adapter_off(tuned):
        np.testing.assert_array_equal(np.asarray(tuned.backbone(probe)), expected)
    np.testing.assert_array_equal(np.asarray(tuned.backbone(probe)), with_adapter)
    assert not np.allclose(with_adapter, expected, atol=1e-4)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "bfloat16"])
def test_lora_variables_stay_float32_under_bf16(policy):
    """keras-hub#2629: bf16 LoRA variables make Adam's updates round away; ours are float32 under
    either bf16 policy (weights stored in fp32 or in bf16)."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        lm = models.load_gemma("tiny-gemma4", sequence_length=32)
        training.enable_lora(lm, 2, "all", 4)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    dtypes = {v.path.rsplit("/", 1)[1]: v.dtype for v in lm.backbone.trainable_weights}
    assert set(dtypes.values()) == {"float32"}, dtypes
    stored = {v.path: v.dtype for v in lm.backbone.weights}
    frozen = stored["decoder_block_0/attention/query/kernel"]
    assert frozen == ("float32" if policy == "mixed_bfloat16" else "bfloat16")


def test_bf16_adapters_are_refused(tiny):
    """What an older Keras builds under a bfloat16 policy is refused in one line."""
    tiny.backbone.enable_lora(2, target_layer_names=training.lora_layer_names("query,value"))
    for layer in training.lora_layers(tiny.backbone):
        # past Keras' state tracking, as an older Keras built it
        object.__setattr__(
            layer, "lora_kernel_a", keras.Variable(layer.lora_kernel_a.value, dtype="bfloat16")
        )
    with pytest.raises(ValueError, match="LoRA adapters in bfloat16.*Keras 3.15\\+") as err:
        training.configure_lora(tiny.backbone, alpha=4)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedules_warm_up_then_decay(kind):
    cfg = training.TrainConfig(learning_rate=1e-3, warmup_steps=10, schedule=kind)
    lr = training.lr_schedule(cfg, total_updates=100)
    values = [float(lr(step)) for step in (0, 5, 10, 55, 100)]
    assert values[0] == 0 and values[1] == pytest.approx(5e-4) and values[2] == pytest.approx(1e-3)
    assert 0 < values[3] < 1e-3 and values[4] == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="SCHEDULE='step'"):
        training.lr_schedule(training.TrainConfig(schedule="step"), 100)


def test_resume_from_finds_an_attached_kernels_latest_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(training.paths, "KAGGLE_INPUT", tmp_path / "input")
    with pytest.raises(FileNotFoundError, match="RESUME_FROM='alice/lora-03': no checkpoint in"):
        training.import_checkpoint("alice/lora-03", "kaggle", tmp_path / "run")
    old = tmp_path / "input" / "lora-03" / "runs" / "kaggle" / "checkpoints"  # older layout
    for name in ("update-000004", "update-000008", "update-000012"):
        (old / name).mkdir(parents=True)
        if name != "update-000012":  # half-written: no progress.json
            (old / name / "progress.json").write_text("{}")
    copy = training.import_checkpoint("alice/lora-03", "kaggle", tmp_path / "run")
    assert copy == tmp_path / "run" / "checkpoints" / "update-000008"
    assert (copy / "progress.json").exists()
    # a folder works too, absolute or relative to where runs are written
    assert training.import_checkpoint(str(old), "x", tmp_path / "other").name == "update-000008"
    monkeypatch.setattr(training.paths, "WORK_ROOT", tmp_path / "input" / "lora-03")
    relative = training.import_checkpoint("runs/kaggle", "x", tmp_path / "third")
    assert relative.name == "update-000008"
    assert training.paths.kaggle_input("lora-03") == []  # not <owner>/<kernel>: never the root

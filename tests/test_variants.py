"""LoRA variants (nbutils.variants): rsLoRA, LoRA+, DoRA and NEFTune against hand computations."""

import functools

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from nbutils import batches, decoding, export, models, sequences, training, variants

ROWS = [
    {"id": str(i), "instruction": "Summarize.", "input": "x = 1\n" * (1 + i), "output": "One x."}
    for i in range(4)
]


def tiny_with(rank=4, targets="all", alpha=8.0, **variant):
    """The tiny Gemma with seeded adapters of a variant (``scaling``, ``dora``)."""
    lm = models.load_gemma("tiny", sequence_length=128, seed=2)
    training.enable_lora(lm, rank, targets, alpha, seed=0, **variant)
    return lm


def randomise(lm, seed=0, scale=0.3):
    """Give every adapter variable (B included) random non-zero values."""
    rng = np.random.default_rng(seed)
    for v in lm.backbone.trainable_variables:
        v.assign(np.asarray(v) * (1 + rng.normal(0, scale, v.shape)).astype("float32"))
    for layer in training.lora_layers(lm.backbone):
        b = layer.lora_kernel_b
        b.assign(rng.normal(0, scale, b.shape).astype("float32"))


def query_layer(lm):
    return training.lora_layers(lm.backbone)[0]


def hidden_in(layer):
    """A random input for ``layer``: 2 rows of 3 tokens, other axes as its kernel's."""
    letters, kernel = layer.equation.split("->")[0].split(",")
    sizes = dict(zip(kernel, np.asarray(layer.kernel).shape))
    shape = [sizes.get(letter, n) for letter, n in zip(letters, (2, 3, 0, 0))]
    return np.random.default_rng(1).normal(size=shape).astype("float32")


def test_rslora_scales_the_update_by_alpha_over_the_root_of_the_rank():
    standard, rs = tiny_with(scaling="standard"), tiny_with(scaling="rslora")
    for lm in (standard, rs):
        randomise(lm)
    layer, rs_layer = query_layer(standard), query_layer(rs)
    assert layer.lora_alpha / layer.lora_rank == 8 / 4
    assert rs_layer.lora_alpha / rs_layer.lora_rank == pytest.approx(8 / 2)
    x = hidden_in(layer)
    w, a, b = (
        np.asarray(v, np.float64) for v in (layer._kernel, layer.lora_kernel_a, layer.lora_kernel_b)
    )
    for lyr, scale in ((layer, 2.0), (rs_layer, 4.0)):
        expected = np.einsum(lyr.equation, x, w + scale * (a @ b))
        np.testing.assert_allclose(np.asarray(lyr(x)), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="LORA_SCALING='sqrt'"):
        training.TrainConfig(scaling="sqrt")


def adamw_step(value, grad, lr, decay, eps=1e-7, b1=0.9, b2=0.999):
    """Keras' AdamW, first step, by hand: decoupled decay, then the bias-corrected Adam step."""
    value = value - value * decay * lr
    m, v = (1 - b1) * grad, (1 - b2) * grad**2
    return value - lr * np.sqrt(1 - b2) / (1 - b1) * m / (np.sqrt(v) + eps)


def test_loraplus_gives_b_its_own_learning_rate():
    lr, decay, ratio = 1e-2, 0.1, 4.0
    lm = tiny_with(targets="query,value")
    randomise(lm)
    arrays = sequences.make_arrays(lm.preprocessor.tokenizer, ROWS, "gemma", 128)
    batch = batches.make_batch(arrays, np.arange(4))
    optimizer = keras.optimizers.AdamW(learning_rate=lr, weight_decay=decay)
    trainer = training.Trainer(lm, optimizer, loraplus_ratio=ratio)
    state = trainer.state()
    before = [np.asarray(x, np.float64) for x in state[0]]
    _, grads = trainer.grad_step(state[0], state[1], batch.inputs(), float(batch.useful_tokens))
    _, state = trainer.update([batch], state)
    kinds = [v.path.rsplit("/", 1)[-1] for v in trainer.trainable]
    assert kinds.count("lora_kernel_a") == kinds.count("lora_kernel_b") == 4
    for kind, old, g, new in zip(kinds, before, grads, state[0], strict=True):
        rate = lr * ratio if kind == "lora_kernel_b" else lr
        expected = adamw_step(old, np.asarray(g, np.float64), rate, decay)
        np.testing.assert_allclose(np.asarray(new), expected, rtol=1e-5, atol=1e-6, err_msg=kind)


def dora_reference(x, w, a, b, m, scale, equation):
    """DoRA's output by its formula: m · (W + s·A·B) / ‖W + s·A·B‖ (norm over the input axes)."""
    contracted, _ = variants.kernel_axes(equation)
    v = w + scale * jnp.matmul(a, b)
    norm = jnp.sqrt(jnp.sum(v**2, axis=contracted, keepdims=True))
    m = jnp.expand_dims(m, contracted) if contracted else m
    return jnp.einsum(equation, x, m * v / norm)


def test_untrained_dora_is_the_base_model_exactly():
    base = models.load_gemma("tiny", sequence_length=128, seed=2)
    dora = tiny_with(dora=True)
    ids = np.array([[2, 10, 20, 30, 40, 50]])
    inputs = {"token_ids": ids, "padding_mask": ids > 0}
    np.testing.assert_array_equal(
        np.asarray(dora.backbone(inputs)), np.asarray(base.backbone(inputs))
    )
    for layer in training.lora_layers(dora.backbone):
        norms = np.sqrt(
            (np.asarray(layer._kernel, np.float64) ** 2).sum(
                variants.kernel_axes(layer.equation)[0]
            )
        )
        np.testing.assert_allclose(np.asarray(layer.dora_magnitude), norms, rtol=1e-6)


@pytest.mark.parametrize("index", [0, 3, 4, 6], ids=["query", "output", "gate", "down"])
def test_dora_forward_and_gradient_follow_the_formula(index):
    lm = tiny_with(dora=True)
    randomise(lm)
    layer = training.lora_layers(lm.backbone)[index]
    x = hidden_in(layer)
    w = jnp.asarray(layer._kernel)
    scale = layer.lora_alpha / layer.lora_rank
    values = [
        jnp.asarray(v) for v in (layer.lora_kernel_a, layer.lora_kernel_b, layer.dora_magnitude)
    ]
    target = jnp.asarray(
        np.random.default_rng(2).normal(size=np.asarray(layer(x)).shape), "float32"
    )

    def ours(a, b, m):
        mapping = list(
            zip((layer.lora_kernel_a, layer.lora_kernel_b, layer.dora_magnitude), (a, b, m))
        )
        with keras.StatelessScope(state_mapping=mapping):
            return jnp.sum(layer(x) * target)

    def formula(a, b, m):
        return jnp.sum(dora_reference(x, w, a, b, m, scale, layer.equation) * target)

    np.testing.assert_allclose(float(ours(*values)), float(formula(*values)), rtol=1e-5)
    mine, theirs = jax.grad(ours, (0, 1, 2))(*values), jax.grad(formula, (0, 1, 2))(*values)
    for name, g, h in zip("abm", mine, theirs, strict=True):
        assert float(jnp.abs(h).max()) > 0, name
        scale_h = float(jnp.abs(h).max())
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(h), rtol=2e-4, atol=1e-6 * scale_h, err_msg=name
        )
    merged = np.einsum(layer.equation, x, np.asarray(variants.merged_kernel(layer)))
    np.testing.assert_allclose(merged, np.asarray(layer(x)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "variant",
    [{"scaling": "rslora"}, {"dora": True}, {"dora": True, "scaling": "rslora"}],
    ids=["rslora", "dora", "dora+rslora"],
)
def test_every_variant_merges_into_the_export_and_reloads_from_its_adapter(variant, tmp_path):
    lm = tiny_with(**variant)
    randomise(lm)
    inputs = export.probe_inputs(lm.preprocessor.tokenizer, ROWS[:2], "gemma", 64)
    reference = export.logits(lm, export.hidden_states(lm, inputs))
    merged = export.merged_copy(lm)
    got = export.logits(merged, export.hidden_states(merged, inputs))
    assert np.abs(got - reference).max() < 1e-4
    cfg = training.TrainConfig(rank=4, targets="all", alpha=8.0, **variant)
    spec = training.adapter_spec(cfg, "tiny", "gemma", 64, {"train": "t", "val": "v"})
    path, _ = training.save_adapter(lm, tmp_path / "a.lora.h5", spec)
    fresh = models.load_gemma("tiny", sequence_length=128, seed=2)
    training.load_adapter(fresh, path, "tiny")
    again = export.logits(fresh, export.hidden_states(fresh, inputs))
    np.testing.assert_array_equal(again, reference)
    with training.adapter_off(lm):  # the base model, DoRA's magnitude included
        base = models.load_gemma("tiny", sequence_length=128, seed=2)
        off = export.logits(lm, export.hidden_states(lm, inputs))
        np.testing.assert_allclose(
            off, export.logits(base, export.hidden_states(base, inputs)), atol=1e-5
        )


def test_neftune_noise_has_its_size_and_only_trains():
    alpha, shape = 5.0, (2, 10, 16)
    noise = np.asarray(variants.neftune_noise(jax.random.PRNGKey(0), shape, alpha, "float32"))
    bound = alpha / np.sqrt(10 * 16)
    assert np.abs(noise).max() <= bound and np.abs(noise).max() > 0.95 * bound
    assert abs(noise.std() - bound / np.sqrt(3)) < 0.1 * bound  # uniform on [-b, b]
    # rows a mesh pads a batch with leave the others' noise alone, in either threefry mode of JAX
    partitionable = jax.config.jax_threefry_partitionable
    try:
        for mode in (False, True):
            jax.config.update("jax_threefry_partitionable", mode)
            two, three = (
                variants.neftune_noise(jax.random.PRNGKey(0), (n, 10, 16), alpha, "float32")
                for n in (2, 3)
            )
            np.testing.assert_array_equal(np.asarray(three)[:2], np.asarray(two), err_msg=mode)
    finally:
        jax.config.update("jax_threefry_partitionable", partitionable)

    lm = tiny_with()
    backbone = lm.backbone
    ids = np.array([[2, 10, 20, 30, 40, 50, 60, 70]])
    scale = np.sqrt(backbone.hidden_dim)
    plain = np.asarray(backbone.token_embedding(ids)) * scale
    with variants.noisy_embeddings(backbone, alpha, jax.random.PRNGKey(3)):
        noisy = np.asarray(backbone.token_embedding(ids)) * scale
    assert "call" not in backbone.token_embedding.__dict__  # put back
    # the noise reaches the decoder at alpha / sqrt(L d), after Gemma's sqrt(d) scale
    diff = np.abs(noisy - plain)
    post = alpha / np.sqrt(ids.shape[1] * backbone.hidden_dim)
    assert diff.max() <= post * 1.001 and diff.max() > 0.9 * post

    arrays = sequences.make_arrays(lm.preprocessor.tokenizer, ROWS, "gemma", 128)
    batch = batches.make_batch(arrays, np.arange(4))
    clean = training.Trainer(lm, keras.optimizers.AdamW(1e-3))
    noisy_trainer = training.Trainer(lm, keras.optimizers.AdamW(1e-3), neftune_alpha=alpha)
    state = clean.state()
    loss = lambda t, seed: float(
        t.grad_step(state[0], state[1], batch.inputs(), float(batch.useful_tokens), seed)[0]
    )
    assert loss(noisy_trainer, np.uint32(1)) != loss(clean, None)
    assert loss(noisy_trainer, np.uint32(1)) == loss(noisy_trainer, np.uint32(1))
    assert noisy_trainer.mean_loss([batch], state) == clean.mean_loss([batch], state)


def test_min_delta_stops_when_improvements_are_smaller(tmp_path):
    rows = ROWS * 4
    runs = {}
    for min_delta in (0.0, 100.0):
        lm = tiny_with()
        cfg = training.TrainConfig(
            rank=4,
            targets="all",
            max_steps=8,
            eval_every=2,
            patience=1,
            min_delta=min_delta,
            batch_size=4,
            checkpoint_every=0,
            learning_rate=1e-3,
        )
        optimizer = training.adamw(cfg, 8)
        runs[min_delta] = training.train_lora(
            lm, optimizer, rows, ROWS, cfg, "gemma", 128, tmp_path / str(min_delta)
        )
    assert runs[0.0]["updates_run"] == 8 and not runs[0.0]["stopped_early"]
    # the first evaluation counts (from no loss at all); the second falls by less than 100
    assert runs[100.0]["updates_run"] == 4 and runs[100.0]["stopped_early"]


def test_steer_bars_early_stops_and_keeps_finished_beams():
    logits = np.zeros((3, 6), np.float32)
    prompt = np.array([[7, 5, 1, 0], [7, 7, 2, 0], [5, 7, 3, 0]])  # end=1: new tokens from index 1
    out = np.asarray(decoding.steer(logits, prompt, 3, 1, [5], min_new=3, beams=1))
    assert (out[:, 5] == decoding.BARRED).all() and (np.delete(out, 5, axis=1) == 0).all()
    out = np.asarray(decoding.steer(logits, prompt, 3, 1, [5], min_new=2, beams=2))
    # row 0 stopped (5 at position 1); row 2's 5 is in its prompt, not an answer
    np.testing.assert_array_equal(out[0], [decoding.BARRED] * 5 + [0])
    assert (out[1:] == 0).all()


def test_a_trained_dora_magnitude_is_not_an_empty_adapter():
    lm = tiny_with(dora=True)
    assert export.adapter_is_empty(lm.backbone)  # B = 0, m = ‖W‖: the base model
    layer = query_layer(lm)
    layer.dora_magnitude.assign(np.asarray(layer.dora_magnitude) * 1.01)
    assert not export.adapter_is_empty(lm.backbone)


@functools.cache  # float32's figures serve both bf16 policies
def one_update_with_every_variant(policy: str):
    """Under ``policy``: the final hidden states of a plain-LoRA model, of its untrained DoRA twin
    and of that twin with every magnitude 0.3% larger; then one update of the twin with LoRA+ and
    NEFTune: its loss, new state and trainer."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        plain, lm = tiny_with(scaling="rslora"), tiny_with(scaling="rslora", dora=True)
        ids = np.array([[2, 10, 20, 30, 40, 50]])
        inputs = {"token_ids": ids, "padding_mask": ids > 0}
        hidden = [np.asarray(m.backbone(inputs), np.float32) for m in (plain, lm)]
        for layer in training.lora_layers(lm.backbone):  # a change bf16 alone would round away
            layer.dora_magnitude.assign(np.asarray(layer.dora_magnitude) * 1.003)
        hidden.append(np.asarray(lm.backbone(inputs), np.float32))
        for layer in training.lora_layers(lm.backbone):
            variants.reset_magnitude(layer)
        arrays = sequences.make_arrays(lm.preprocessor.tokenizer, ROWS, "gemma", 128)
        optimizer = keras.optimizers.AdamW(learning_rate=1e-2)
        trainer = training.Trainer(lm, optimizer, loraplus_ratio=4.0, neftune_alpha=5.0)
        state = trainer.state()
        loss, state = trainer.update([batches.make_batch(arrays, np.arange(4))], state, 7)
        return hidden, loss, state, trainer
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "bfloat16"])
def test_variants_train_in_bf16_with_a_float32_magnitude(policy):
    """Under either bf16 policy DoRA's magnitude and every adapter stay float32, an untrained DoRA
    model computes its plain-LoRA twin's hidden states to bf16 rounding, a 0.3% larger magnitude
    changes them, and one update with every variant is finite, near fp32's loss, and moves each
    magnitude."""
    (plain, dora, nudged), loss, state, trainer = one_update_with_every_variant(policy)
    (plain32, _, _), loss32, _, _ = one_update_with_every_variant("float32")
    assert trainer.backbone.compute_dtype == "bfloat16"
    assert all(np.asarray(v).dtype == np.float32 for v in state[0])
    scale = np.abs(plain32).max()
    assert np.abs(plain - plain32).max() > 0  # bf16 did round
    np.testing.assert_allclose(dora, plain, atol=2**-7 * scale)  # a bf16 step at the largest
    assert (nudged != dora).any()  # a bf16 factor would round 1.003 to 1
    assert np.isfinite(loss) and loss == pytest.approx(loss32, rel=2e-2)
    kinds = [v.path.rsplit("/", 1)[-1] for v in trainer.trainable]
    magnitudes = [new for kind, new in zip(kinds, state[0]) if kind == variants.MAGNITUDE]
    norms = [
        variants.column_norms(layer._kernel, layer.equation)
        for layer in training.lora_layers(trainer.backbone)
    ]
    assert len(magnitudes) == len(norms) == 7 * trainer.backbone.num_layers
    for m, norm in zip(magnitudes, norms):
        assert np.isfinite(np.asarray(m)).all() and not np.array_equal(np.asarray(m), norm)

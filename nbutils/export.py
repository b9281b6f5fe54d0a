"""Exports of the tuned model (notebook 06), each checked on a probe batch against the model as
trained.

Notebook 03 saves a *probe* (``probe.npz``: a few validation rows' token ids and the trained model's
final hidden states). Every export is reloaded and its logits on the probe are compared with the
logits of those saved hidden states (same frozen output layer), as ``max |Δlogit|``.

keras-hub's exporters read each layer's raw kernel, so they would drop the LoRA update; exports are
made from :func:`merged_copy`, a LoRA-free model whose kernels are ``W + (alpha/r)·A·B`` (for DoRA
``m·(W + s·A·B)/‖W + s·A·B‖``, see :mod:`nbutils.variants`).

Every matmul here runs at full float32 precision (:data:`CHECK_PRECISION`): by default a TPU
multiplies float32 matrices in one bf16 pass (an Ampere+ GPU in TF32), whose round-off would
swamp the merge's and fail the checks whatever the export.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import jax
import keras
import numpy as np

from nbutils import compat, devices, files, paths, sequences, variants
from nbutils.training import lora_layers

PROBE_FILE = "probe.npz"
PROBE_ROWS = 2
PROBE_KEYS = ("token_ids", "padding_mask", "hidden", "policy", "distributed")
KAGGLE_OUTPUT_GB = 20.0  # what Kaggle keeps of /kaggle/working per kernel version
CHECK_PRECISION = "highest"  # jax.default_matmul_precision for the merge and every comparison


def full_precision() -> contextlib.AbstractContextManager:
    """Matmuls at :data:`CHECK_PRECISION` inside the block."""
    return jax.default_matmul_precision(CHECK_PRECISION)


def device_record() -> dict[str, str]:
    """Where the checks ran: platform, device kind and the matmul precision they used."""
    platform, kind, _ = devices.device_facts()
    with full_precision():
        precision = str(jax.config.jax_default_matmul_precision)
    return {"platform": platform, "device_kind": kind, "matmul_precision": precision}


def probe_inputs(
    tokenizer, rows: list[dict], template, sequence_length: int
) -> dict[str, np.ndarray]:
    """Token ids and padding mask of ``rows`` (prompt + response), trimmed to the longest row."""
    arrays = sequences.make_arrays(tokenizer, rows, template, sequence_length)
    width = int(arrays["padding_mask"].sum(axis=1).max())
    return {
        "token_ids": arrays["token_ids"][:, :width],
        "padding_mask": arrays["padding_mask"][:, :width],
    }


def hidden_states(lm, inputs: dict) -> np.ndarray:
    """The backbone's final (normalized) hidden states ``(rows, width, hidden)`` in float32."""

    with full_precision():
        hidden = lm.backbone(
            compat.text_inputs(lm.backbone, inputs["token_ids"], inputs["padding_mask"])
        )
        return np.asarray(keras.ops.convert_to_numpy(hidden), dtype=np.float32)


def logits(lm, hidden: np.ndarray) -> np.ndarray:
    """Logits from hidden states through ``lm``'s output layer (the tied embedding, with its
    soft-cap)."""

    with full_precision():
        output = lm.backbone.token_embedding(hidden, reverse=True)
        return np.asarray(keras.ops.convert_to_numpy(output), dtype=np.float32)


def save_probe(lm, inputs: dict, path: Path) -> Path:
    """Write the probe inputs, ``lm``'s hidden states on them, its dtype policy and whether a device
    mesh was in use (``.npz``, no pickle), atomically."""

    with files.atomic_path(Path(path)) as tmp:
        np.savez(
            tmp,
            **inputs,
            hidden=hidden_states(lm, inputs),
            policy=np.array(lm.backbone.dtype_policy.name),
            distributed=np.array(keras.distribution.distribution() is not None),
        )
    return Path(path)


def load_probe(path: Path) -> dict[str, np.ndarray]:
    """The probe notebook 03 saved; a one-line error when it is missing or incomplete."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: re-run notebooks/03_lora_finetune.ipynb (it saves the probe with the adapter)."
        )
    with np.load(path, allow_pickle=False) as f:
        probe = {k: f[k] for k in f.files}
    if "policy" in probe:
        # probes saved before the flag existed were single-device
        probe.setdefault("distributed", np.array(False))
    if set(probe) != set(PROBE_KEYS):
        raise ValueError(
            f"{path}: expected arrays {', '.join(PROBE_KEYS)}, found {', '.join(sorted(probe))}; re-run notebook 03."
        )
    probe["policy"], probe["distributed"] = str(probe["policy"]), bool(probe["distributed"])
    return probe


def adapter_is_empty(backbone) -> bool:
    """True when every LoRA ``B`` matrix is zero and every DoRA magnitude ``‖W‖`` (as initialised):
    the adapter changes nothing."""

    return all(
        not np.any(keras.ops.convert_to_numpy(layer.lora_kernel_b))
        and variants.magnitude_is_initial(layer)
        for layer in lora_layers(backbone)
    )


def merged_copy(lm):
    """A LoRA-free copy of ``lm`` (same class, same preprocessor) whose kernels are the adapted
    ones (``variants.merged_kernel``)."""
    backbone = lm.backbone.__class__.from_config(lm.backbone.get_config())
    source = {v.path: v for v in lm.backbone.weights}
    with full_precision():
        merged = {
            f"{layer.path}/kernel": variants.merged_kernel(layer)
            for layer in lora_layers(lm.backbone)
        }
    missing = [v.path for v in backbone.weights if v.path not in source]
    if missing or not set(merged) <= {v.path for v in backbone.weights}:
        raise ValueError(
            f"cannot match the model's weights by path ({(missing or sorted(merged))[:3]}…); "
            "the backbone class changed how it names layers."
        )
    for v in backbone.weights:
        v.assign(merged.get(v.path, source[v.path]))
    return lm.__class__(backbone=backbone, preprocessor=lm.preprocessor)


def save_keras_preset(lm, folder: Path) -> Path:
    """``lm.save_to_preset`` into ``folder``, atomically (the folder appears complete or not at
    all)."""
    with files.atomic_dir(Path(folder)) as tmp:
        lm.save_to_preset(str(tmp))
    return Path(folder)


def save_transformers(lm, folder: Path) -> Path:
    """``lm.export_to_transformers`` (config, safetensors, tokenizer) into ``folder``,
    atomically."""
    with files.atomic_dir(Path(folder)) as tmp:
        lm.export_to_transformers(str(tmp))
        if type(lm.backbone).__name__ == "Gemma4Backbone":
            gemma4_export_fixes(lm.backbone, tmp)
    return Path(folder)


def gemma4_export_fixes(backbone, folder: Path) -> None:
    """Make keras-hub 0.32's Gemma 4 transformers export load back into the model it came from.

    Its exporter writes ``num_global_key_value_heads`` even for a model without one, and its
    importer takes that field to mean "global layers reuse the key as the value" (26B, 31B): it
    builds those layers without their value projection. Its importer also reads
    ``processor_config.json``, which a text-only export lacks (no section of it applies; a
    multimodal export's importer needs its real image and audio sections, not written here).
    """
    config = files.read_json(folder / "config.json")
    if backbone.num_global_key_value_heads is None:
        # a multimodal model's text settings are nested under text_config
        config.get("text_config", config).update(
            num_global_key_value_heads=None, attention_k_eq_v=False
        )
        files.write_json(folder / "config.json", config)
    text_only = not ({"vision_config", "audio_config"} & set(config))
    if text_only and not (folder / "processor_config.json").exists():
        files.write_json(folder / "processor_config.json", {})


def compare(reference: np.ndarray, candidate: np.ndarray, tolerance: float) -> dict:
    """``max |Δ|`` between two logit arrays against ``tolerance``."""
    if reference.shape != candidate.shape:
        return {
            "max_abs_diff": None,
            "tolerance": tolerance,
            "passed": False,
            "error": f"shape {candidate.shape} != {reference.shape}",
        }
    diff = float(np.max(np.abs(reference - candidate)))
    return {"max_abs_diff": diff, "tolerance": tolerance, "passed": diff <= tolerance}


def differing_token_ids(reference_tokenizer, candidate_tokenizer, texts: list[str]) -> int:
    """How many of ``texts`` the two tokenizers turn into different ids."""
    pairs = zip(
        sequences.tokenize_batch(reference_tokenizer, texts),
        sequences.tokenize_batch(candidate_tokenizer, texts),
    )
    return sum(a != b for a, b in pairs)


def folder_mb(path: Path) -> float:
    """Size of a file or folder in MB."""
    path = Path(path)
    sizes = (
        [p.stat().st_size for p in path.rglob("*") if p.is_file()]
        if path.is_dir()
        else [path.stat().st_size]
    )
    return round(sum(sizes) / 1e6, 1)


def check_reloaded(lm, probe: dict, reference) -> dict:
    """The adapter rebuilt from its file against the trained model's probe: exact (tolerance 0) when
    03 trained in fp32 on one device; skipped, saying why, otherwise (bf16 or sharded training
    computed differently from this single-device fp32 check)."""
    if probe["policy"] == "float32" and not probe["distributed"]:
        return compare(logits(lm, probe["hidden"]), reference, 0.0)
    mesh = " on a device mesh" if probe["distributed"] else ""
    why = f"trained under {probe['policy']}{mesh}; checked in float32 on one device"
    return {"skipped": why, "passed": None}


class ExportSpaceError(RuntimeError):
    """The exports would not fit where they are written."""


def space_left_gb(folder: Path) -> tuple[float, str]:
    """GB the exports may use under ``folder``, and what limits it: Kaggle's output area less
    what is already there, or the disk's free space."""
    folder = next(p for p in [Path(folder), *Path(folder).parents] if p.exists())
    free = shutil.disk_usage(folder).free / 1e9
    if paths.ON_KAGGLE:
        used = sum(f.stat().st_size for f in paths.WORK_ROOT.rglob("*") if f.is_file()) / 1e9
        if KAGGLE_OUTPUT_GB - used < free:
            return KAGGLE_OUTPUT_GB - used, f"Kaggle's {KAGGLE_OUTPUT_GB:.0f} GB output area"
    return free, "free disk space"


def check_space(lm, exports: list[str], folder: Path) -> str:
    """One line with the exports' estimated size (each a float32 copy of the weights) against the
    space left; raises :class:`ExportSpaceError` naming the fix when they would not fit."""
    each = sum(np.prod(v.shape) for v in lm.backbone.weights) * 4 / 1e9
    needed, (left, limit) = each * len(exports), space_left_gb(folder)
    line = (
        f"exports: {len(exports)} x {each:.2f} GB = {needed:.2f} GB; {left:.1f} GB left ({limit})"
    )
    if needed > 0.95 * left:
        raise ExportSpaceError(
            f"{line}: the exports would not fit; set EXPORTS to fewer formats "
            f"(now {','.join(exports)}), e.g. EXPORTS='keras'."
        )
    return line

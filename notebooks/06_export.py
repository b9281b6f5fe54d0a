# %% [markdown]
# # 06 · Export the tuned model, and check every export
#
# **Purpose:** turn the base model + the run's LoRA adapter into files other tools load — a merged
# keras-hub preset, Hugging Face transformers safetensors, and a GGUF for llama.cpp / Ollama — and
# prove each one computes what the trained model computed.
#
# - **Reads:** `runs/<RUN_ID>/adapter.lora.h5`, `adapter.json`, `probe.npz` (from 03),
# `data/processed/<DATASET>/` (from 01).
# - **Writes:** `runs/<RUN_ID>/export/` (`keras/`, `transformers/`, `model.gguf`,
# `export_verification.json`).
# - **Previous:** `04_evaluate` · **Next:** none

# %%
import glob, os, sys  # Setup, the same in every notebook: skip it when reading.

if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):  # on Kaggle: find and unpack the code dataset
    sys.path += glob.glob("/kaggle/input/*") + glob.glob("/kaggle/input/*/*/*")  # either layout
    import kaggle_setup  # noqa: F401
from nbutils import frameworks  # noqa: F401

# %%
import numpy as np
from IPython.display import Markdown, display

from nbutils import data, devices, export, files, gguf_port, models, prompts, report, runs, training

# %% tags=["parameters"]
MODEL = "auto"  # 'auto' (embedded 270M offline, preset on Kaggle), 'tiny', a keras-hub preset, a folder or .gguf
DATASET = "pycode-summary"  # built-in task, 'hf:<owner>/<name>', 'kaggle:<owner>/<dataset>'; the data/processed folder name
RUN_ID = "manual"  # outputs go to runs/<RUN_ID>/
EXPORTS = "keras,transformers,gguf"  # formats, comma-separated (each a full copy of the model)
TOLERANCE = 0.001  # max |logit difference| allowed for a merged export

# %% [markdown]
# ## 1. The trained model, rebuilt from its adapter
# Notebook 03 saved a *probe*: two validation rows and the trained model's final hidden states on
# them. Rebuilding base + adapter from `adapter.lora.h5` must give the **same** logits (tolerance 0:
# same weights, same computation; checked when 03 trained in fp32 on one device). The rebuilt
# model's logits are the reference for every export; the base model's show how much the adapter
# changes them, so a check can tell a dropped adapter from round-off.

# %%
MODEL = models.choose_model(MODEL)
exports = [e.strip() for e in EXPORTS.split(",") if e.strip()]
unknown = set(exports) - {"keras", "transformers", "gguf"}
if unknown:
    raise ValueError(
        f"EXPORTS={EXPORTS!r}: unknown {', '.join(sorted(unknown))}; use keras, transformers and/or gguf."
    )
devices.use_precision("fp32")  # checks in fp32, whatever the training precision was
out, spec = runs.run_dir(RUN_ID), runs.read_step_output(RUN_ID, "03_lora_finetune")
probe = export.load_probe(out / export.PROBE_FILE)
inputs = {"token_ids": probe["token_ids"], "padding_mask": probe["padding_mask"]}
splits, manifest = data.load_processed(DATASET)
template = prompts.Template(spec["template"], spec["stop_token"])
# for the tokenizer checks
texts = [prompts.render_prompt(r, template) + r["output"] for r in splits["val"][:32]]

# %%
lm = models.load_gemma(MODEL, sequence_length=spec["sequence_length"])
base_logits = export.logits(lm, export.hidden_states(lm, inputs))
training.load_adapter(lm, out / "adapter.lora.h5", MODEL)
# the reference for every export below
reference = export.logits(lm, export.hidden_states(lm, inputs))
# the rebuilt model must match the trained one exactly (when that run can be compared: fp32, one device)
checks = {"adapter_reloaded": export.check_reloaded(lm, probe, reference)}
effect = float(np.max(np.abs(reference - base_logits)))
empty = export.adapter_is_empty(lm.backbone)
print(
    f"probe: {inputs['token_ids'].shape[0]} rows x {inputs['token_ids'].shape[1]} tokens; "
    f"adapter changes the logits by up to {effect:.3g}"
)
if empty:
    print(
        "the adapter is EMPTY (every B matrix is zero): the tuned model is the base model; the exports are of the base."
    )
# Merged exports may differ from the unmerged model by fp32 round-off, never by the adapter itself:
# the tolerance is TOLERANCE or a tenth of the adapter's effect, whichever is smaller.
tolerance = TOLERANCE if empty else min(TOLERANCE, effect / 10)
print(f"tolerance for the merged exports: {tolerance:.3g}")

# %% [markdown]
# ## 2. Merge the adapter into the weights
# keras-hub's exporters read each layer's raw kernel `W`, so they would silently drop the adapter.
# We fold it in first: a copy of the model, without LoRA, whose kernels are `W + (alpha / r) · A·B`
# (Keras' `layer.kernel` of a LoRA layer). The result is an ordinary Gemma that needs no adapter.

# %%
print(export.check_space(lm, exports, out / "export"))  # before anything is written
merged = export.merged_copy(lm)
del lm  # one model in memory fewer
checks["merged_in_memory"] = export.compare(
    reference, export.logits(merged, export.hidden_states(merged, inputs)), tolerance
)
folder = out / "export"

# %% [markdown]
# ## 3. Write each export, load it back, compare
# - **keras-hub preset**: `save_to_preset`, reloaded with
# `keras_hub.models.CausalLM.from_preset(folder)`
#   (`models.load_gemma(folder)` calls it).
# - **transformers**: `export_to_transformers` writes `config.json`, `model.safetensors` and the
#   tokenizer; keras-hub's own transformers converter loads it back (`from_preset` on the folder).
# - **GGUF** (f32, llama.cpp's Gemma 3 layout): written with the `gguf` package and read back with
#   the project's GGUF port, the one that loads the embedded model. For the transformers and GGUF
#   exports the tokenizer travels too, so it is checked: the same ids on 32 validation texts.


# %%
def check(name, reloaded):
    """Compare a reloaded export's logits (and tokenizer) with the trained model's."""
    checks[name] = export.compare(
        reference, export.logits(reloaded, export.hidden_states(reloaded, inputs)), tolerance
    )
    differing = export.differing_token_ids(
        merged.preprocessor.tokenizer, reloaded.preprocessor.tokenizer, texts
    )
    checks[f"{name}_tokenizer"] = {
        "differing_texts": differing,
        "tolerance": 0,
        "passed": differing == 0,
    }


# %%
written = {}
if "keras" in exports:
    written["keras"] = export.save_keras_preset(merged, folder / "keras")
    # from_preset(folder)
    check("keras_preset", models.load_gemma(str(written["keras"]), spec["sequence_length"]))
if "transformers" in exports:
    written["transformers"] = export.save_transformers(merged, folder / "transformers")
    # keras-hub converts it
    check("transformers", models.load_gemma(str(written["transformers"]), spec["sequence_length"]))
if "gguf" in exports and gguf_port.exportable(merged.backbone):
    written["gguf"] = gguf_port.write_gguf(
        merged, folder / "model.gguf", name=f"{MODEL} + LoRA ({RUN_ID})"
    )
    check("gguf", models.gguf_causal_lm(written["gguf"]))
elif "gguf" in exports:
    print(f"GGUF skipped: {gguf_port.not_exportable_reason(merged.backbone)}")

# %% [markdown]
# ## 4. Verification report
# `export_verification.json` holds every check; a failed one stops the notebook here.

# %%
verification = {
    "checks": checks,
    "adapter": {
        "empty": empty,
        "max_abs_logit_change": effect,
        "rank": spec["rank"],
        "targets": spec["targets"],
    },
    "files": {
        k: {"path": str(p.relative_to(out)), "mb": export.folder_mb(p)} for k, p in written.items()
    },
    "probe_shape": list(inputs["token_ids"].shape),
    "device": export.device_record(),
}
verification_file = files.write_json(folder / "export_verification.json", verification)

# %%
display(
    Markdown(
        report.table(
            [{"check": k, **c} for k, c in checks.items()],
            ("check", "max_abs_diff", "differing_texts", "tolerance", "passed"),
        )
    )
)
failed = [k for k, c in checks.items() if c["passed"] is False]
if failed:
    raise AssertionError(f"export check(s) failed: {', '.join(failed)} (see {verification_file})")

# %% [markdown]
# ## Summary
# Every requested export was written and matched the trained model; an adapter that changed nothing
# would have been reported above.

# %%
saved = files.read_json(verification_file)
assert all(c["passed"] is not False for c in saved["checks"].values())
assert saved["device"]["matmul_precision"] == "highest"
assert (
    "skipped" in saved["checks"]["adapter_reloaded"]
    or saved["checks"]["adapter_reloaded"]["max_abs_diff"] == 0.0
)
assert set(written) == {e for e in exports if e != "gguf" or gguf_port.exportable(merged.backbone)}
assert all(p.exists() for p in written.values())
assert empty or tolerance < effect, "a dropped adapter would pass these checks"
sizes = ", ".join(f"{name} ({entry['mb']} MB)" for name, entry in saved["files"].items())
print(f"OK: {sizes} in {folder}")

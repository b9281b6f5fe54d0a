# %% [markdown]
# # 05 · Experiments: LoRA rank, targets and learning rate
#
# **Purpose:** train several LoRA configurations on one shared budget, compare them on the
# validation split, choose one by a stated rule, and test only that one.
#
# - **Reads:** `data/processed/<DATASET>/` (from 01), `runs/<RUN_ID>/baseline_*` (from 02).
# - **Writes:** `runs/<RUN_ID>/sweep/<config>/` (adapter, log, `result.json`), `sweep_results.csv`,
#   `sweep.png`, `sweep_report.md`, `sweep_choice.json` (the chosen parameters), `sweep_test.json`.
# - **Previous:** `02_baseline_inference` (runs after 01 and 02; independent of 03–04) · **Next:**
# none

# %%
import glob, os, sys  # Setup, the same in every notebook: skip it when reading.

if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):  # on Kaggle: find and unpack the code dataset
    sys.path += glob.glob("/kaggle/input/*") + glob.glob("/kaggle/input/*/*/*")  # either layout
    import kaggle_setup  # noqa: F401
from nbutils import frameworks  # noqa: F401

# %%
from IPython.display import Image, Markdown, display

from nbutils import (
    data,
    devices,
    evaluation,
    files,
    models,
    plots,
    prompts,
    report,
    runs,
    sweep,
    training,
)

# %% tags=["parameters"]
MODEL = "auto"  # 'auto' (embedded 270M offline, preset on Kaggle), 'tiny', a keras-hub preset, a folder or .gguf
DATASET = "pycode-summary"  # built-in task, 'hf:<owner>/<name>', 'kaggle:<owner>/<dataset>'; the data/processed folder name
RUN_ID = "manual"  # outputs go to runs/<RUN_ID>/
SEED = 0  # seeds the split, the adapters, the data order and sampling
RANK = 8  # LoRA rank r: adapters are (d x r) and (r x k)
LORA_TARGETS = "query,value"  # 'query,value', 'attention', 'all', or a list of query,key,value,output,gate,up,down
LORA_ALPHA = 0.0  # the update is scaled by alpha / rank; 0 means alpha equal to the rank
LORA_SCALING = "standard"  # 'standard': alpha / r; 'rslora': alpha / sqrt(r) (rank-stabilised)
LORAPLUS_RATIO = 1.0  # LoRA+: B's learning rate over A's (1: plain LoRA)
DORA = False  # DoRA: a trained magnitude per output unit times the normalised W + s·A·B
NEFTUNE_ALPHA = 0.0  # NEFTune: noise alpha / sqrt(L·d) on the embeddings while training (0: off)
LEARNING_RATE = 0.0002  # AdamW peak learning rate, in (0, 1)
WEIGHT_DECAY = 0.01  # AdamW decoupled weight decay (not on biases and norm scales)
WARMUP_STEPS = 10  # linear warmup updates
SCHEDULE = "cosine"  # decay after warmup
CLIPNORM = 1.0  # clip the global norm of all adapter gradients (0: off)
BATCH_SIZE = 4  # rows per batch
GRAD_ACCUM = 1  # batches per optimizer update
EPOCHS = 1.0  # passes over the train split (when MAX_STEPS is 0)
MAX_STEPS = 0  # optimizer updates (0: EPOCHS passes); 05: per configuration
EVAL_EVERY = 25  # validation loss every this many updates
PATIENCE = 3  # early stopping: evaluations without improvement
MIN_DELTA = 0.0  # early stopping: a fall of the validation loss by less is no improvement
MAX_VAL_ROWS = 0  # validation rows used (0: the whole split)
MIXED_PRECISION = "auto"  # 'auto': bf16 on TPU and GPUs of compute capability 8.0+, else fp32; weights in bf16 where fp32 cannot fit
DISTRIBUTION = "auto"  # 'auto', 'none', 'data' or 'model:<data>x<model>'
REQUIRE_ACCELERATOR = False  # stop at once when JAX sees only the CPU
N_BOOTSTRAP = 1000  # paired bootstrap resamples
SWEEP = {"rank": [1, 2, 4, 8, 16, 32], "targets": ["query,value", "all"]}  # grid or config list
QUANTIZE = ""  # base weights where a configuration does not say ('' float, 'int8' QLoRA-style)

# %% [markdown]
# ## 1. The grid and the shared budget
# Every configuration trains on the same rows, in the same order, for the same number of updates
# with the same schedule and seed, so differences come from the configuration alone. Generation
# settings (answer length, sampler) are notebook 02's, read from its output.

# %%
MODEL = models.choose_model(MODEL)
devices.require_accelerator(REQUIRE_ACCELERATOR)
devices.use_distribution(DISTRIBUTION)
policy = devices.use_precision(MIXED_PRECISION, models.preset_params(MODEL))
baseline = runs.read_step_output(RUN_ID, "02_baseline_inference")
settings = baseline["settings"]
if settings["model"] != MODEL:
    raise ValueError(
        f"RUN_ID={RUN_ID!r} has a baseline for model={settings['model']!r}, not {MODEL!r}; rerun 02."
    )
splits, manifest = data.load_processed(DATASET)
data.check_split_hashes(settings["split_sha256"], manifest, "notebook 02 (baseline)")
template, SEQUENCE_LENGTH = (
    prompts.Template.from_manifest(manifest, MODEL),
    manifest["params"]["sequence_length"],
)
val_rows, test_rows = splits["val"][: MAX_VAL_ROWS or None], splits["test"][: settings["test_rows"]]
out = runs.run_dir(RUN_ID)
# %%
# where a configuration does not say, notebook 03's parameters (RANK, LORA_TARGETS, …, DORA) and
# 02's decoding: they also make the default configuration
defaults = sweep.notebook_defaults(globals(), settings)
configs = sweep.expand(SWEEP, defaults)
default_config = sweep.expand([{}], defaults)[0]
if default_config not in configs:
    configs.append(default_config)  # trained too, so the test comparison has it
# %%
budget = {
    "model": MODEL,
    "dataset": DATASET,
    "split_sha256": manifest["split_sha256"],
    "batch_size": BATCH_SIZE,
    "grad_accum": GRAD_ACCUM,
    "epochs": EPOCHS,
    "max_steps": MAX_STEPS,
    "warmup_steps": WARMUP_STEPS,
    "schedule": SCHEDULE,
    "weight_decay": WEIGHT_DECAY,
    "clipnorm": CLIPNORM,
    "eval_every": EVAL_EVERY,
    "patience": PATIENCE,
    "min_delta": MIN_DELTA,
    "val_rows": len(val_rows),
    "precision": policy,
    "seed": SEED,
    "generation": {k: settings[k] for k in ("max_new_tokens", "seed", "gen_batch_size")},
}
done = {
    sweep.config_name(c)
    for c in configs
    if sweep.finished(out / "sweep" / sweep.config_name(c), budget)
}
print(
    f"{len(configs)} configurations, {len(done)} already finished: {', '.join(sweep.config_name(c) for c in configs)}"
)

# %% [markdown]
# ## 2. Train each configuration
# Notebook 03's recipe for each configuration (`training.enable_lora` and `training.adamw` are its
# steps 1 and 2 as functions): a fresh base model, adapters on the targets, AdamW with the shared
# schedule; then an answer for every validation row, decoded as the configuration says (02's way by
# default), to score validation ROUGE-L. Configurations that differ in decoding only share one
# trained adapter; finished ones are skipped, so a killed sweep continues where it stopped.


# %%
def train_config(config: dict, folder, twin: dict | None) -> dict:
    """Train one configuration on the shared budget (or load its ``twin``'s adapter); save its
    adapter and validation answers."""
    lm = models.load_gemma(MODEL, sequence_length=SEQUENCE_LENGTH, seed=SEED)
    if config["quantize"]:
        # before enable_lora, as keras.io's QLoRA recipe does
        training.quantize_base(lm, config["quantize"])
    cfg = training.TrainConfig.from_parameters({**globals(), **sweep.parameters(config)})
    if twin is None:
        variant = {"scaling": config["scaling"], "dora": config["dora"]}
        params = training.enable_lora(
            lm, config["rank"], config["targets"], config["alpha"], seed=SEED, **variant
        )
        optimizer = training.adamw(cfg, training.plan(cfg, len(splits["train"]))["updates"])
        result = training.train_lora(
            lm, optimizer, splits["train"], val_rows, cfg, template, SEQUENCE_LENGTH, folder
        )
    else:  # trained already: the same adapter, decoded another way
        training.load_adapter(lm, out / "sweep" / twin["name"] / "adapter.lora.h5", MODEL)
        params, result = training.parameter_summary(lm), sweep.twin_training(twin)
    training.save_adapter(
        lm,
        folder / "adapter.lora.h5",
        training.adapter_spec(cfg, MODEL, template, SEQUENCE_LENGTH, manifest["split_sha256"]),
    )
    answers = evaluation.generate(
        lm,
        val_rows,
        template,
        settings["max_new_tokens"],
        settings["gen_batch_size"],
        config["sampler"],
        settings["seed"],
        min_new_tokens=config["min_new_tokens"],
    )
    files.write_jsonl(folder / "val_scores.jsonl", evaluation.score_rows(answers))
    return sweep.record(
        config, budget, result, params, files.read_jsonl(folder / "val_scores.jsonl")
    )


# %%
results = []
for n, config in enumerate(configs, 1):
    folder = out / "sweep" / sweep.config_name(config)
    result = sweep.finished(folder, budget)
    if result is None:
        twin = sweep.training_twin(config, results)
        print(
            f"[{n}/{len(configs)}] {folder.name}: {'decoding' if twin else 'training'}", flush=True
        )
        result = train_config(config, folder, twin)
        # written last: marks the configuration finished
        files.write_json(folder / "result.json", result)
    print(
        f"[{n}/{len(configs)}] {folder.name}: {result['trainable_params']:,} params, best val loss "
        f"{result['best_val_loss']:.3f}, val ROUGE-L {result['val_rougeL_f1']:.3f}, {result['train_seconds']} s"
    )
    results.append(result)

# %% [markdown]
# ## 3. Results
# One row per configuration (`sweep_results.csv`), and the picture: quality and loss against the
# adapter's size (log scale, one line per target set), and the validation curves.

# %%
files.write_csv(out / "sweep_results.csv", results, sweep.CSV_COLUMNS)
display(Markdown(report.table(results, sweep.CSV_COLUMNS)))
display(Image(filename=str(plots.sweep_plot(results, out / "sweep.png"))))

# %% [markdown]
# ## 4. The choice, on validation only
# **Rule:** take the configuration with the best validation ROUGE-L; every configuration whose
# difference from it has a paired-bootstrap 95% CI containing 0 (over validation rows, resampling
# whole modules where rows come in modules) is within noise of it; among those, choose the one with
# the fewest trainable parameters. The test split is not looked at until the choice is made.

# %%
val_scores = {
    r["name"]: files.read_jsonl(out / "sweep" / r["name"] / "val_scores.jsonl") for r in results
}
groups = data.bootstrap_groups(val_rows)
choice = sweep.choose(results, val_scores, N_BOOTSTRAP, SEED, groups)
chosen = next(r for r in results if r["name"] == choice["chosen"])
conclusion = sweep.conclusion(choice, results)
display(Markdown(conclusion))
choice_file = files.write_json(out / "sweep_choice.json", sweep.choice_parameters(chosen))

# %% [markdown]
# ## 5. The chosen adapter on the test split, once
# Against the base model (notebook 02's answers) and against the default configuration, each with a
# paired bootstrap 95% CI as in notebook 04.


# %%
def test_scores(name: str) -> list[dict]:
    """Test-split scores of one configuration's saved adapter (on a base quantized as in
    training)."""
    lm = models.load_gemma(MODEL, sequence_length=SEQUENCE_LENGTH, seed=SEED)
    config = files.read_json(out / "sweep" / name / "result.json")
    if config.get("quantize"):
        training.quantize_base(lm, config["quantize"])
    training.load_adapter(lm, out / "sweep" / name / "adapter.lora.h5", MODEL)
    _, scores, _ = evaluation.run_inference(
        lm,
        test_rows,
        template,
        SEQUENCE_LENGTH,
        settings["max_new_tokens"],
        settings["gen_batch_size"],
        config.get("sampler", settings["sampler"]),
        settings["seed"],
        min_new_tokens=config.get("min_new_tokens", 0),
    )
    return scores


# %%
test_groups = data.bootstrap_groups(test_rows)
chosen_test = test_scores(chosen["name"])
default_name = sweep.config_name(default_config)
default_test = chosen_test if default_name == chosen["name"] else test_scores(default_name)
vs_base = evaluation.paired_bootstrap(
    files.read_jsonl(out / "baseline_scores.jsonl"), chosen_test, N_BOOTSTRAP, SEED, test_groups
)
vs_default = evaluation.paired_bootstrap(default_test, chosen_test, N_BOOTSTRAP, SEED, test_groups)
earlier = (
    files.read_json(out / "sweep_test.json").get("evaluations", [])
    if (out / "sweep_test.json").exists()
    else []
)
# a rerun (e.g. a larger grid) looks at the test split again: say so, and keep every evaluation
if earlier:
    print(
        f"note: the test split was evaluated {len(earlier)} time(s) before in this run "
        f"({', '.join(e['chosen'] for e in earlier)}); all are kept in sweep_test.json"
    )
evaluation_record = {
    "chosen": chosen["name"],
    "default": default_name,
    "vs_baseline": vs_base,
    "vs_default": vs_default,
}
# %%
files.write_json(out / "sweep_test.json", {"evaluations": [*earlier, evaluation_record]})
display(Markdown("**Chosen vs base model** (test)\n\n" + report.comparison_table(vs_base)))
display(
    Markdown(
        f"**Chosen vs default `{default_name}`** (test; 'baseline' column = default)\n\n"
        + report.comparison_table(vs_default)
    )
)
test_sentence = sweep.test_sentence(chosen["name"], default_name, vs_base, vs_default)
display(Markdown(test_sentence))

# %% [markdown]
# ## 6. Report
# `sweep_report.md` gathers the table, the figure, the choice and the test result;
# `sweep_choice.json` can be passed on: `python -m nbutils.pipeline --profile cpu --params
# runs/<RUN_ID>/sweep_choice.json`.

# %%
report_path = files.write_text(
    out / "sweep_report.md",
    sweep.report_markdown(
        RUN_ID, results, choice, conclusion, test_sentence, report.comparison_table(vs_base)
    ),
)
print(f"report: {report_path}")

# %% [markdown]
# ## Summary
# Every configuration finished with a finite loss, the choice follows the rule, and the files are
# there.

# %%
saved = files.read_json(choice_file)
assert len(results) == len(configs) and all(r["best_val_loss"] < float("inf") for r in results)
assert saved["RANK"] == chosen["rank"] and saved["LORA_TARGETS"] == chosen["targets"]
assert chosen["name"] in choice["candidates"] and chosen["trainable_params"] == min(
    r["trainable_params"] for r in results if r["name"] in choice["candidates"]
)
assert len((out / "sweep_results.csv").read_text().splitlines()) == len(results) + 1
assert (out / "sweep.png").stat().st_size > 0 and report_path.read_text().startswith("# ")
print(f"OK: {len(results)} configurations; chosen {chosen['name']}")

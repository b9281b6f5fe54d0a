"""Train the tiny Gemma for 12 updates with a checkpoint every 4 (a subprocess of
tests/test_resume.py).

Usage: python tests/_resumable_training.py OUT_DIR [--resume | --resume-from OWNER/KERNEL|FOLDER]
[--slow] [--variants]. ``--slow`` sleeps after each update so the test can signal the process
between checkpoints; it does not change what is computed. ``--variants`` trains with DoRA, rsLoRA,
LoRA+ and NEFTune.
"""

import sys
import time
from pathlib import Path

import numpy as np

import nbutils  # noqa: F401  (KERAS_BACKEND=jax)
from nbutils import models, training

out = Path(sys.argv[1])
ROWS = [
    {
        "id": str(i),
        "instruction": "Summarize the code.",
        "input": f"def f{i}(x):\n    return x * {i}\n" * (1 + i % 3),
        "output": f"Multiply x by {i}." + " Then return it." * (i % 2),
    }
    for i in range(24)
]
variants = (
    {"scaling": "rslora", "dora": True, "loraplus_ratio": 4.0, "neftune_alpha": 5.0}
    if "--variants" in sys.argv
    else {}
)
cfg = training.TrainConfig(
    **variants,
    rank=4,
    targets="all",
    learning_rate=1e-2,
    warmup_steps=2,
    max_steps=12,
    eval_every=3,
    batch_size=4,
    checkpoint_every=4,
    patience=10,
    seed=1,
)
if "--slow" in sys.argv:
    update = training.Trainer.update
    training.Trainer.update = lambda self, micro, state, *seed: (
        time.sleep(0.4),
        update(self, micro, state, *seed),
    )[1]
lm = models.load_gemma("tiny", sequence_length=128, seed=1)
training.enable_lora(lm, cfg.rank, cfg.targets, 8, cfg.seed, cfg.scaling, cfg.dora)
if "--resume-from" in sys.argv:  # an attached Kaggle kernel's output (NBUTILS_KAGGLE_INPUT)
    training.import_checkpoint(sys.argv[sys.argv.index("--resume-from") + 1], "kaggle", out)
training.train_lora(
    lm,
    training.adamw(cfg, cfg.max_steps),
    ROWS,
    ROWS[:4],
    cfg,
    "gemma",
    128,
    out,
    resume="--resume" in sys.argv or "--resume-from" in sys.argv,
)
np.savez(out / "final_adapter.npz", *[np.asarray(v) for v in lm.backbone.trainable_weights])

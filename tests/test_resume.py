"""Checkpoints and resume: a run killed (SIGKILL) and stopped (SIGTERM) ends exactly where an
uninterrupted run ends."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nbutils import models, training

SCRIPT = Path(__file__).with_name("_resumable_training.py")


@pytest.fixture
def env(tmp_path):
    """The processes' environment: a compilation cache of their own (a process killed while
    writing an entry leaves it truncated, and no other test's process should meet it)."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache")}


def start(out: Path, env: dict, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, (
            f"the training process ended before {path.name}: {proc.communicate()[1][-2000:]}"
        )
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def log_values(out: Path) -> list[tuple]:
    with open(out / "train_log.csv", newline="") as f:
        return [
            (r["step"], r["train_loss"], r["val_loss"], r["learning_rate"])
            for r in csv.DictReader(f)
        ]


def adapter(out: Path) -> list[np.ndarray]:
    with np.load(out / "final_adapter.npz") as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def test_killed_and_stopped_run_resumes_to_the_uninterrupted_result(tmp_path, env):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    # runs beside the interrupted one (deterministic: order is free)
    with open(tmp_path / "straight.err", "w") as err:
        uninterrupted = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(straight)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    try:
        # 1. killed without warning just after its first checkpoint
        proc = start(broken, env, "--slow")
        wait_for(broken / "checkpoints" / "update-000004" / "progress.json", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert not (broken / "final_adapter.npz").exists()
        assert training.latest_checkpoint(broken / "checkpoints").name == "update-000004"

        # 2. resumed, then stopped with SIGTERM: it checkpoints, then exits
        proc = start(broken, env, "--resume", "--slow")
        wait_for(broken / "checkpoints" / "update-000008" / "progress.json", proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and not (broken / "final_adapter.npz").exists()
        stopped = training.latest_checkpoint(broken / "checkpoints")
        assert (
            f"SIGTERM received: stopped after update {int(stopped.name[-6:])}/12, checkpoint {stopped}"
            in err.splitlines()[-1]
        )
        assert "RESUME: continuing after update 4" in out

        proc = start(broken, env, "--resume")  # 3. resumed to the end
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "straight.err").read_text()[-2000:]
        # keep 2
        assert [p.name for p in sorted((straight / "checkpoints").iterdir())] == [
            "update-000004",
            "update-000008",
        ]
    finally:
        uninterrupted.kill()  # a no-op once it has ended
    assert f"RESUME: continuing after update {int(stopped.name[-6:])}" in out
    for a, b in zip(adapter(straight), adapter(broken), strict=True):
        # exact: same XLA programs on the same CPU, same data order
        np.testing.assert_array_equal(a, b)
    assert log_values(straight) == log_values(broken) and len(log_values(broken)) == 12


def test_a_run_with_every_variant_resumes_to_the_uninterrupted_result(tmp_path):
    """DoRA's magnitudes, LoRA+'s steps and NEFTune's noise (drawn from the update number) resume
    exactly: 12 updates straight, and 8 of them then 4 more in a new session that finds the first
    one's output attached as Kaggle mounts it (newer layout)."""
    straight, later = tmp_path / "straight", tmp_path / "later"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(straight), "--variants"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    attached = tmp_path / "input" / "notebooks" / "alice" / "lora-03" / "runs" / "kaggle"
    shutil.copytree(straight / "checkpoints", attached / "checkpoints")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(later), "--variants", "--resume-from", "alice/lora-03"],
        capture_output=True,
        text=True,
        env={**os.environ, "NBUTILS_KAGGLE_INPUT": str(tmp_path / "input")},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RESUME: continuing after update 8" in done.stdout
    assert len(adapter(straight)) == 3 * 14  # A, B and a DoRA magnitude per layer
    for a, b in zip(adapter(straight), adapter(later), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_refuses_other_parameters_or_data(tmp_path):
    cfg = training.TrainConfig(rank=4, targets="all", max_steps=2, checkpoint_every=1, batch_size=2)
    arrays = {"adapter": [np.zeros(3)], "optimizer": [np.zeros(3)], "best": []}
    run = {"update": 1, "best": 1.0, "waited": 0, "history": {}, "data_sha256": "abc"}
    training.save_checkpoint(tmp_path / "checkpoints", run, arrays, [], cfg)
    other = training.TrainConfig(
        rank=4, targets="all", max_steps=2, checkpoint_every=5, batch_size=2, learning_rate=0.5
    )
    with pytest.raises(
        ValueError,
        match=r"update-000001: made with LEARNING_RATE=0.0002 but now LEARNING_RATE=0.5; resume with the same",
    ):
        training._resume(tmp_path / "checkpoints", other, "abc", None, None, {}, None)
    # CHECKPOINT_EVERY may change
    same = training.TrainConfig(
        rank=4, targets="all", max_steps=2, checkpoint_every=5, batch_size=2
    )
    with pytest.raises(ValueError, match=r"update-000001: made on other training/validation data"):
        training._resume(tmp_path / "checkpoints", same, "another", None, None, {}, None)


def test_a_fresh_run_clears_old_checkpoints_and_rotation_keeps_the_newest(tmp_path):
    cfg = training.TrainConfig(
        rank=4, targets="all", checkpoint_every=1, keep_checkpoints=2, batch_size=2
    )
    arrays = {"adapter": [np.zeros(3)], "optimizer": [np.zeros(3)], "best": []}
    # an old run's 250 must not outlive the new ones once the new run rotates
    for update in (250, 1, 2, 3):
        if update == 1:
            # what train_lora does for a fresh run (resume=False)
            shutil.rmtree(tmp_path / "checkpoints")
        training.save_checkpoint(
            tmp_path / "checkpoints",
            {"update": update, "best": 1.0, "waited": 0, "history": {}},
            arrays,
            [],
            cfg,
        )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "update-000002",
        "update-000003",
    ]
    training.save_checkpoint(
        tmp_path / "checkpoints",
        {"update": 1, "best": 1.0, "waited": 0, "history": {}},
        arrays,
        [],
        cfg,
    )
    # never deletes the one just written
    assert (tmp_path / "checkpoints" / "update-000001").exists()


def test_training_from_scratch_removes_another_runs_checkpoints(tmp_path):
    lm = models.load_gemma("tiny", sequence_length=128)
    training.enable_lora(lm, 4, "query,value", 8)
    stale = tmp_path / "checkpoints" / "update-000999"
    stale.mkdir(parents=True)
    (stale / "progress.json").write_text("{}")
    cfg = training.TrainConfig(
        rank=4, max_steps=3, eval_every=3, batch_size=4, checkpoint_every=1, warmup_steps=0
    )
    rows = [
        {"instruction": "Say it.", "input": f"item {i}", "output": f"It is {i}."} for i in range(8)
    ]
    training.train_lora(lm, training.adamw(cfg, 3), rows, rows[:4], cfg, "gemma", 128, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "update-000001",
        "update-000002",
    ]

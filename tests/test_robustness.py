"""Crash safety (SIGKILL at random moments, then --resume), numerical guards, skipped images."""
from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file

from oltr.cli import main
from oltr.config import load_config
from oltr.data import load_benchmark
from oltr.errors import InputError, OltrError
from oltr.evaluation.closed_open import evaluate_run
from oltr.ownership import remove_stale_temporaries, write_marker
from oltr.pipeline import train_run
from oltr.train.checkpoint import load_checkpoint

EPOCHS = 12
# One OpenMP thread: the runs compared must use the same thread count, and on a busy 2-core
# machine extra threads only contend.
CHILD_ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _train_command(data: Path, out: Path, tiny: list[str], *, resume: bool) -> list[str]:
    return [sys.executable, "-m", "oltr.cli", "train", "--method", "plain", "--data", str(data),
            "--out", str(out), "--no-progress", *(["--resume"] if resume else []), *tiny,
            f"train.epochs={EPOCHS}", "train.max_steps_per_epoch=8", "deterministic=true"]


def _wait_for(log: Path, text: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None, f"training ended before printing {text!r}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{log.read_text()}"
        time.sleep(0.01)


def _tensors(stage: Path) -> dict[str, torch.Tensor]:
    """Final weights, optimiser momentum buffers and selected (best-on-val) weights of a stage."""
    state = load_checkpoint(stage / "checkpoint.pt")
    tensors = {f"model.{k}": v for k, v in state["model"].items()}
    for index, buffers in state["optimizer"]["state"].items():
        tensors |= {f"optimizer.{index}.{k}": v for k, v in buffers.items()}
    tensors |= {f"selected.{k}": v for k, v in load_file(str(stage / "model.safetensors")).items()}
    return tensors


def test_sigkill_at_random_moments_then_resume_ends_with_uninterrupted_weights(
    fmnist_small, tiny, tmp_path
) -> None:
    reference = tmp_path / "reference"
    subprocess.run(_train_command(fmnist_small, reference, tiny, resume=False), env=CHILD_ENV,
                   check=True, capture_output=True, timeout=300)
    history = [json.loads(line) for line in (reference / "main" / "history.jsonl").open()]
    epoch_seconds = sum(h["seconds"] for h in history) / len(history)

    run, stage = tmp_path / "killed", tmp_path / "killed" / "main"
    rng = random.Random(2)
    done = 0  # epochs in the checkpoint
    for attempt in range(3):
        log = tmp_path / f"attempt{attempt}.log"
        with log.open("w") as handle:
            process = subprocess.Popen(
                _train_command(fmnist_small, run, tiny, resume=attempt > 0),
                env=CHILD_ENV, stdout=handle, stderr=subprocess.STDOUT,
            )
        try:
            _wait_for(log, f"training epochs {done + 1}..{EPOCHS}", process)
            # Let 0-2 epochs finish, then kill anywhere in the next one: mid-step, in
            # validation, while saving.
            finished = rng.randint(0, 2)
            if finished:
                _wait_for(log, f"[main] epoch {done + finished}/{EPOCHS} ", process)
            time.sleep(rng.uniform(0.0, epoch_seconds))
            assert process.poll() is None, "the run finished before it could be killed"
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=60) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if done:
            assert f"resuming after epoch {done} of {EPOCHS}" in log.read_text()
        assert finished == 0 or (stage / "checkpoint.pt").exists()
        if (stage / "checkpoint.pt").exists():  # absent or whole: never a broken file
            state = load_checkpoint(stage / "checkpoint.pt")
            assert done + finished <= state["epoch"] < EPOCHS
            done = state["epoch"]
            lines = (stage / "history.jsonl").read_text().splitlines()
            assert len(lines) in (done, done + 1)  # written just before the checkpoint
            assert [json.loads(line)["epoch"] for line in lines][:done] == list(range(1, done + 1))
        if (run / "config.yaml").exists():
            assert yaml.safe_load((run / "config.yaml").read_text())["method"] == "plain"

    final = subprocess.run(_train_command(fmnist_small, run, tiny, resume=True), env=CHILD_ENV,
                           check=False, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    if done:
        assert f"resuming after epoch {done} of {EPOCHS}" in final.stdout
    assert load_checkpoint(stage / "checkpoint.pt")["epoch"] == EPOCHS

    expected, got = _tensors(reference / "main"), _tensors(stage)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    resumed = [json.loads(line) for line in (stage / "history.jsonl").open()]
    strip = ("seconds", "images_per_second")
    assert [{k: v for k, v in h.items() if k not in strip} for h in resumed] == [
        {k: v for k, v in h.items() if k not in strip} for h in history
    ]
    assert not list(run.rglob("*.tmp-*"))  # a killed writer's temporary files are cleaned up


def test_sigkill_while_writing_leaves_the_previous_file_and_a_removable_temporary(
    tmp_path,
) -> None:
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous checkpoint")
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from oltr.io import atomic_write\n"
        "def half_then_killed(tmp):\n"
        "    Path(tmp).write_bytes(b'new checkp')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write(Path(sys.argv[1]), half_then_killed)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(target)], check=False,
                            env=CHILD_ENV, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"previous checkpoint"
    (leftover,) = tmp_path.glob(".checkpoint.pt.tmp-*")
    assert remove_stale_temporaries(tmp_path) == []  # not in a directory oltr owns
    write_marker(tmp_path, "stage")
    assert remove_stale_temporaries(tmp_path) == [leftover] and not leftover.exists()


def test_stale_temporary_files_of_dead_writers_are_removed(fmnist_small, tiny, tmp_path) -> None:
    run = tmp_path / "run"
    train_run(load_config("plain", overrides=[*tiny, "train.epochs=1"]), fmnist_small, run,
              progress=False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = run / "main" / f".checkpoint.pt.tmp-oltr-{dead.pid}"
    stale.write_bytes(b"half a checkpoint")
    live = run / "main" / ".model.json.tmp-oltr-1"  # pid 1 is alive: its writer may be at work
    live.write_text("{")
    # a user's file that merely looks like a temporary file is not oltr's (issue 9)
    lookalike = run / "main" / f".notes.txt.tmp-{dead.pid}"
    lookalike.write_text("mine")
    train_run(load_config("plain", overrides=[*tiny, "train.epochs=1"]), fmnist_small, run,
              resume=True, progress=False)
    assert not stale.exists() and live.exists() and lookalike.read_text() == "mine"


def _poison_losses(monkeypatch, bad_calls: set[int]) -> None:
    """Make the training loss NaN at the given (1-based) calls of cross_entropy."""
    real, calls = F.cross_entropy, itertools.count(1)

    def cross_entropy(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * float("nan") if next(calls) in bad_calls else loss

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    fmnist_small, tiny, tmp_path, monkeypatch
) -> None:
    run = tmp_path / "run"
    _poison_losses(monkeypatch, {5})  # 3 steps per epoch: epoch 2, step 2
    with pytest.raises(OltrError, match="non-finite training loss .*train.nonfinite=skip"):
        train_run(load_config("plain", overrides=[*tiny, "train.epochs=3"]), fmnist_small, run,
                  progress=False)
    assert load_checkpoint(run / "main" / "checkpoint.pt")["epoch"] == 1
    assert len((run / "main" / "history.jsonl").read_text().splitlines()) == 1
    assert json.loads((run / "main" / "model.json").read_text())["epoch"] == 1


def test_non_finite_loss_skip_skips_and_counts_the_steps(
    fmnist_small, tiny, tmp_path, monkeypatch
) -> None:
    run = tmp_path / "run"
    _poison_losses(monkeypatch, {2, 5, 6})
    overrides = [*tiny, "train.epochs=3", "train.nonfinite=skip"]
    (result,) = train_run(load_config("plain", overrides=overrides), fmnist_small, run,
                          progress=False)
    assert result.epochs_run == 3
    history = [json.loads(line) for line in (run / "main" / "history.jsonl").open()]
    assert [h["skipped_steps"] for h in history] == [1, 2, 0]
    state = load_checkpoint(run / "main" / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # The optimiser took 9 - 3 steps (SGD keeps no step count; the scheduler counts them).
    assert state["scheduler"]["last_epoch"] == 6

    _poison_losses(monkeypatch, set(range(1, 100)))
    with pytest.raises(OltrError, match="every step of an epoch had a non-finite loss"):
        train_run(load_config("plain", overrides=overrides), fmnist_small, tmp_path / "nan",
                  progress=False)


def _corrupt(bench: Path, split: str, index: int, how: str) -> tuple[str, int]:
    """Damage the image on line ``index + 1`` of ``split``; return (image path, line)."""
    relative = (bench / f"{split}.txt").read_text().splitlines()[index].rsplit(maxsplit=1)[0]
    image = bench / "images" / relative
    if how == "truncate":
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        image.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    else:
        image.unlink()
    return str(image), index + 1


def test_skip_bad_images_in_train_and_evaluate(fmnist_small, tiny, tmp_path, capsys) -> None:
    bench = tmp_path / "bench"
    shutil.copytree(fmnist_small, bench)
    _corrupt(bench, "train", 0, "truncate")
    val_image, val_line = _corrupt(bench, "val", 2, "garbage")
    test_image, test_line = _corrupt(bench, "test", 5, "missing")
    _corrupt(bench, "open", 1, "truncate")
    args = ["train", "--method", "plain", "--data", str(bench), "--no-progress", *tiny,
            "train.epochs=1"]

    assert main([*args, "--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err  # the missing test image stops it before anything is made
    assert re.match(rf"oltr train: error: {bench}/test.txt:{test_line}: image not found: ", err)
    assert not (tmp_path / "strict").exists()
    args_present = [*args, f"data.image_root={tmp_path / 'bench-with-test'}"]
    shutil.copytree(bench / "images", tmp_path / "bench-with-test")
    moved = Path(test_image).relative_to(bench / "images")
    shutil.copy(fmnist_small / "images" / moved, tmp_path / "bench-with-test" / moved)
    assert main([*args_present, "--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err  # the first bad image read stops the run
    assert re.match(rf"oltr train: error: {bench}/(train|val).txt:\d+: cannot read image ", err)

    run = tmp_path / "run"
    assert main([*args, "--out", str(run), "--skip-bad-images"]) == 0
    out = capsys.readouterr().out
    assert "[main] skipping 2 unreadable images (train 1, val 1):" in out
    assert f"val.txt:{val_line}: cannot read image {val_image}" in out
    assert "stage main: skipped 2 unreadable images (train 1, val 1)" in out
    info = json.loads((run / "main" / "model.json").read_text())
    assert info["skipped_images"] == {"train": 1, "val": 1}
    counts = json.loads((fmnist_small / "manifest.json").read_text())["counts"]["train"]
    assert info["train_counts"] == [counts[0] - 1, *counts[1:]]

    # The run's config says skip: evaluate skips too, and the report counts per split.
    assert main(["evaluate", str(run), "--data", str(bench), "--open"]) == 0
    out = capsys.readouterr().out
    assert "skipped 3 unreadable images (test 1, val 1, open 1)" in out
    report = json.loads((run / "report.json").read_text())
    assert report["skipped_images"] == {"test": 1, "val": 1, "open": 1}
    assert report["open"]["num_known"] == 4 * 30 - 1 and report["open"]["num_open"] == 30 - 1

    strict = tmp_path / "strict-run"
    train_run(load_config("plain", overrides=[*tiny, "train.epochs=1"]), fmnist_small, strict,
              progress=False)
    with pytest.raises(InputError, match=rf"test.txt:{test_line}: image not found: {test_image}"):
        evaluate_run(strict, bench, open_set=False)
    report = evaluate_run(strict, bench, open_set=False, skip_bad_images=True)
    assert report["skipped_images"] == {"test": 1}


def test_skip_bad_images_refuses_to_empty_a_class(tmp_path) -> None:
    root = tmp_path / "bench"
    root.mkdir()
    for name in ("a0", "a1", "v0", "v1"):
        Image.new("L", (8, 8), 9).save(root / f"{name}.png")
    (root / "b0.png").write_bytes(b"broken")
    (root / "train.txt").write_text("a0.png 0\na1.png 0\nb0.png 1\n")
    (root / "val.txt").write_text("v0.png 0\nv1.png 1\n")
    bench = load_benchmark(root)
    with pytest.raises(InputError, match=r"train.txt: class 1 \('class_1'\) has no readable "
                                         r"train image left \(first unreadable: .*train.txt:3"):
        bench.drop_unreadable_images(["train"])

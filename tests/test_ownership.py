"""Issue 9, run side: oltr never deletes or overwrites what it did not write, locks a run while it
trains, stamps what it derives from weights with those weights, and leaves nothing half-made
when it stops (bad input, a full disk, SIGTERM / SIGHUP / Ctrl-C).

Every data-loss case of the issue is replayed through the command line on generated folders,
and the user's files are compared (listing + sha256) before and after.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_pre_hook

from oltr.cli import main
from oltr.config import load_config
from oltr.data.sources import FASHION_MNIST_SYSTEM_DIR
from oltr.errors import InputError
from oltr.inference import load_model
from oltr.ownership import MARKER, locked, marker_kind, remove_stale_staging, write_marker
from oltr.pause import PAUSE_AT, PAUSE_FILE
from oltr.pipeline import train_run
from oltr.train.checkpoint import save_model

TINY = ["model.width=8", "train.batch_size=32", "train.max_steps_per_epoch=2",
        "eval.batch_size=256", "train.epochs=1"]
CHILD_ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _tree(root: Path, classes: int = 3, images: int = 12) -> Path:
    for label in range(classes):
        folder = root / f"c{label}"
        folder.mkdir(parents=True)
        for i in range(images):
            Image.new("L", (28, 28), (label * 40 + i) % 256).save(folder / f"{i:02d}.png")
    return root


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: relative path → sha256 of a file, or 'dir'."""
    listing = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        listing[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return listing


CURATE_ARGS = ["--max-count", "6", "--min-count", "2", "--val-per-class", "2",
               "--test-per-class", "2", "--known", "3"]


@pytest.fixture
def user_files(tmp_path: Path, monkeypatch) -> Path:
    """A user's home: photos (a folder source), data/ with raw images, a split file and other
    files, an unrelated folder holding another tool's run, and an oltr-curated benchmark."""
    monkeypatch.chdir(tmp_path)
    _tree(tmp_path / "photos")
    _tree(tmp_path / "data" / "raw")
    (tmp_path / "data" / "notes.txt").write_text("my notes")
    (tmp_path / "data" / "other").mkdir()
    (tmp_path / "data" / "other" / "thing.bin").write_bytes(os.urandom(64))
    lines = [f"c{label}/{i:02d}.png {label}" for label in range(3) for i in range(12)]
    (tmp_path / "data" / "raw" / "train.txt").write_text("\n".join(lines) + "\n")
    mine = tmp_path / "mine"
    (mine / "main").mkdir(parents=True)
    (mine / "run.json").write_text('{"final_stage": "main", "tool": "not oltr"}\n')
    (mine / "main" / "model.json").write_text('{"weights": "mine"}\n')
    (mine / "notes.txt").write_text("keep me")
    dead = subprocess.Popen(["true"])
    dead.wait()
    # looks like oltr's old temporary file names, and its writer is dead: still the user's
    (mine / f".config.yaml.tmp-{dead.pid}").write_text("user data")
    assert main(["curate", "folder:photos", "--out", "bench", *CURATE_ARGS]) == 0
    return tmp_path


def _refused(argv: list[str], capsys, message: str, status: int = 2) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == status, err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


DATA_LOSS_CASES = [
    (["curate", "folder:photos", "--out", "photos", "--force"], "is the source itself"),
    (["curate", "folder:photos", "--out", "photos/c0", "--force"], "lies inside the source"),
    (["curate", "folder:data/raw", "--out", "data", "--force"], "contains the source"),
    (["curate", "splits:data/raw/train.txt", "--out", "data", "--force"], "contains the source"),
    (["curate", "folder:photos", "--out", "mine", "--force"],
     "mine: output directory was not written by oltr curate (no .oltr marker)"),
    (["curate", "folder:photos", "--out", "mine"], "mine: output directory exists and is not empty"),
    (["curate", "folder:photos", "--out", ".", "--force"], "contains the source"),
    (["train", "--method", "plain", "--data", "bench", "--out", "mine", "--resume"],
     "mine: run directory was not written by oltr (no .oltr marker)"),
    (["train", "--method", "plain", "--data", "bench", "--out", "mine", "--stage", "main"],
     "mine: run directory was not written by oltr"),
    (["train", "--method", "plain", "--data", "bench", "--out", "mine"],
     "mine: run directory is not empty; pass --resume to continue it or choose another --out"),
    (["train", "--method", "plain", "--data", "bench", "--out", "bench", "--resume"],
     "bench: run directory is the source itself"),
    (["train", "--method", "plain", "--data", "bench", "--out", "mine/run.json"],
     "run.json: run directory exists and is not a directory"),
    (["bench", "--data", "bench", "--out", "mine", "--quick", "--seeds", "0", "--methods",
      "plain"], "mine: bench directory was not written by oltr"),
]


@pytest.mark.parametrize(("argv", "message"), DATA_LOSS_CASES,
                         ids=[" ".join(a) for a, _ in DATA_LOSS_CASES])
def test_data_loss_cases_touch_nothing_of_the_user(user_files, capsys, argv, message) -> None:
    before = _snapshot(user_files)
    _refused(argv, capsys, message)
    assert _snapshot(user_files) == before


def test_refused_from_inside_the_source_too(user_files, capsys, monkeypatch) -> None:
    """``--out .`` from inside the user's folder, and ``..`` around a source."""
    before = _snapshot(user_files)
    monkeypatch.chdir(user_files / "mine")
    _refused(["curate", f"folder:{user_files / 'photos'}", "--out", ".", "--force"], capsys,
             "is the working directory")
    monkeypatch.chdir(user_files / "photos")
    _refused(["curate", "folder:.", "--out", "..", "--force"], capsys, "contains the source")
    assert _snapshot(user_files) == before


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="real Fashion-MNIST missing")
def test_make_run_commands_against_a_user_folder(user_files, capsys) -> None:
    """What `make run DATA=mine RUN=mine` runs: both stop with one line, nothing changes."""
    before = _snapshot(user_files)
    _refused(["curate", "fashion-mnist", "--protocol", "fmnist_lt", "--out", "mine", "--force"],
             capsys, "mine: output directory was not written by oltr curate")
    _refused(["train", "--method", "plain", "--data", "bench", "--out", "mine", "--seed", "0",
              "--resume", "--no-progress"], capsys, "mine: run directory was not written by oltr")
    assert _snapshot(user_files) == before


def test_force_replaces_only_what_oltr_curated(user_files, capsys) -> None:
    bench = user_files / "bench"
    assert marker_kind(bench) == "curate"
    assert main(["curate", "folder:photos", "--out", "bench", "--force", *CURATE_ARGS,
                 "--seed", "1"]) == 0  # oltr's own benchmark: replaced
    assert json.loads((bench / "manifest.json").read_text())["seed"] == 1
    (bench / "my-results.csv").write_text("precious")
    before = _snapshot(user_files)
    _refused(["curate", "folder:photos", "--out", "bench", "--force", *CURATE_ARGS], capsys,
             "bench: output directory holds 'my-results.csv', which oltr curate did not write")
    assert _snapshot(user_files) == before
    assert sorted(p.name for p in user_files.iterdir() if p.name.startswith(".")) == []


def test_stale_staging_is_removed_only_when_it_is_oltrs_and_its_writer_dead(tmp_path) -> None:
    out = tmp_path / "bench"
    dead = subprocess.Popen(["true"])
    dead.wait()
    made = {}
    for name, marker in [(f".bench.partial-{dead.pid}-0123abcd", True),   # killed curation
                         (f".bench.old-{dead.pid}-89abcdef", True),       # killed replacement
                         (f".bench.partial-{dead.pid}-fedcba98", False),  # not oltr's: kept
                         (".bench.partial-1-0123abcd", True),             # pid 1 alive: kept
                         (".bench.partial-mine", True)]:                  # not oltr's name
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.txt").write_text("x")
        if marker:
            write_marker(tmp_path / name, "curate")
        made[name] = marker
    removed = remove_stale_staging(out)
    assert sorted(p.name for p in removed) == sorted(
        [f".bench.partial-{dead.pid}-0123abcd", f".bench.old-{dead.pid}-89abcdef"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".bench.partial-{dead.pid}-fedcba98", ".bench.partial-1-0123abcd", ".bench.partial-mine"])


# ------------------------------------------------------------------ make run, twice
def test_make_run_style_commands_repeat_on_what_oltr_wrote(fmnist_small, tmp_path, capsys,
                                                           monkeypatch) -> None:
    """`make run`: curate --force (re-curation of oltr's own benchmark) and train --resume
    (a fresh run the first time, a finished one the second) both keep working."""
    monkeypatch.chdir(tmp_path)
    _tree(tmp_path / "photos")
    for _ in range(2):
        assert main(["curate", "folder:photos", "--out", "data/x", "--force", *CURATE_ARGS]) == 0
        assert main(["train", "--method", "plain", "--data", str(fmnist_small), "--out",
                     "runs/plain", "--resume", "--no-progress", *TINY]) == 0
    assert marker_kind(tmp_path / "runs" / "plain") == "run"
    assert marker_kind(tmp_path / "runs" / "plain" / "main") == "stage"
    assert "resuming after epoch 1 of 1" in capsys.readouterr().out


# ------------------------------------------------------------------ fresh runs that fail
@pytest.mark.parametrize("before", ["absent", "empty", "absent, sibling made meanwhile"])
def test_a_fresh_run_that_fails_before_an_epoch_leaves_nothing(fmnist_small, tmp_path,
                                                               capsys, before) -> None:
    run = tmp_path / "runs" / "r"
    if before == "empty":
        run.mkdir(parents=True)

    def disk_full(*_args):  # before the first optimiser step: no epoch finishes
        if before.endswith("meanwhile"):  # another process's run next to this one
            (tmp_path / "runs" / "other").mkdir()
            (tmp_path / "runs" / "other" / "x").write_text("theirs")
        raise OSError(28, "No space left on device", str(run / "main" / "checkpoint.pt"))

    hook = register_optimizer_step_pre_hook(disk_full)
    argv = ["train", "--method", "plain", "--data", str(fmnist_small), "--out", str(run),
            "--no-progress", *TINY]
    try:
        _refused(argv, capsys, "checkpoint.pt: No space left on device (ENOSPC)", status=1)
    finally:
        hook.remove()
    if before == "empty":
        assert run.is_dir() and list(run.iterdir()) == []  # the user's empty folder stays
    elif before == "absent":
        assert not (tmp_path / "runs").exists()  # the directories it made are gone too
    else:
        assert _snapshot(tmp_path / "runs") == {
            "other": "dir", "other/x": hashlib.sha256(b"theirs").hexdigest()}
    assert main(argv) == 0  # the fixed command works: no "run directory is not empty"


def test_a_failure_after_an_epoch_keeps_the_run_for_resume(fmnist_small, tmp_path) -> None:
    run = tmp_path / "run"

    def second_epoch_fails(*_args):  # before every optimiser step
        if (run / "main" / "checkpoint.pt").exists():  # epoch 1 is done
            raise KeyboardInterrupt

    config = load_config("plain", overrides=[*TINY, "train.epochs=2"])
    hook = register_optimizer_step_pre_hook(second_epoch_fails)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_run(config, fmnist_small, run, progress=False)
    finally:
        hook.remove()
    assert (run / "main" / "checkpoint.pt").is_file()


# ------------------------------------------------------------------ run lock
def test_a_run_being_trained_is_locked_against_train_and_evaluate(fmnist_small, tmp_path,
                                                                  capsys) -> None:
    run = tmp_path / "run"
    train = [sys.executable, "-m", "oltr.cli", "train", "--method", "plain", "--data",
             str(fmnist_small), "--out", str(run), "--no-progress", *TINY, "train.epochs=200"]
    log = tmp_path / "train.log"
    child, paused = _paused_child(train, log, "train:step@3")  # still training: epoch 2
    try:
        _wait_for(paused.exists, child, log)
        assert "[main] epoch 1/200" in log.read_text()
        holder = f"pid {child.pid}"
        _refused(["train", "--method", "plain", "--data", str(fmnist_small), "--out", str(run),
                  "--no-progress", "--resume", *TINY, "train.epochs=200"], capsys,
                 f"run: run directory is in use by another oltr process ({holder})")
        _refused(["evaluate", str(run), "--data", str(fmnist_small), "--open"], capsys,
                 f"run directory is in use by another oltr process ({holder})")
        assert not (run / "report.json").exists()
        elsewhere = tmp_path / "report.json"
        assert main(["evaluate", str(run), "--data", str(fmnist_small), "--open",
                     "--output", str(elsewhere)]) == 0
        assert f"is still training ({holder})" in capsys.readouterr().err
        child.send_signal(signal.SIGKILL)  # the OS releases the lock of a killed process
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    config = load_config("plain", overrides=[*TINY, "train.epochs=200"])
    held_here = f"in use by another oltr process \\(pid {os.getpid()}"
    with locked(run, "run directory"), pytest.raises(InputError, match=held_here):
        train_run(config, fmnist_small, run, resume=True, progress=False)


# ------------------------------------------------------------------ stale thresholds
def test_predict_refuses_a_decision_rule_of_other_weights(fmnist_small, tmp_path,
                                                         capsys) -> None:
    """The decision rule (threshold, τ's, open score) saved when the run was trained belongs
    to those weights: new weights make predict refuse it, and evaluate fits it anew."""
    run = tmp_path / "run"
    train_run(load_config("plain", overrides=TINY), fmnist_small, run, progress=False)
    rule = json.loads((run / "decision.json").read_text())
    weights = run / "main" / "model.safetensors"
    assert rule["record"]["weights"] == {
        "stage": "main", "epoch": 1, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    image = str(next((fmnist_small / "images").rglob("*.png")))
    assert main(["predict", str(run), image]) == 0
    assert main(["evaluate", str(run), "--data", str(fmnist_small), "--open"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["weights"] == rule["record"]["weights"]
    capsys.readouterr()

    # training went on (as when evaluate ran during training): new weights of a later epoch
    net, info = load_model(run / "main")
    with torch.no_grad():
        for tensor in net.parameters():
            tensor.add_(0.01)
    info = {k: v for k, v in info.items() if k != "weights_sha256"} | {"epoch": 13}
    save_model(run / "main", net, info)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() != rule["record"]["weights"]["sha256"]
    _refused(["predict", str(run), image], capsys,
             f"{run / 'decision.json'}: the decision rule was fitted for other weights "
             "(the stage was trained again after it); re-run `oltr evaluate RUN --data DIR` to "
             "fit it anew")
    _refused(["predict", str(run), image, "--threshold", "0.5"], capsys, "re-run `oltr evaluate")
    assert main(["evaluate", str(run), "--data", str(fmnist_small), "--open"]) == 0
    assert json.loads((run / "report.json").read_text())["weights"]["epoch"] == 13
    refit = json.loads((run / "decision.json").read_text())
    assert refit["record"]["weights"]["epoch"] == 13
    assert main(["predict", str(run), image]) == 0


# ------------------------------------------------------------------ signals
def _wait_for(predicate, process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.005)


def _paused_child(argv: list[str], log: Path, point: str) -> tuple[subprocess.Popen, Path]:
    """``argv`` run with its output in ``log``, told to stop and wait for a signal at the pause
    point ``point`` (`oltr.pause`); returns the process and the file it creates when there.
    SIGINT reaches the child even when this process was started ignoring it (a background job
    of a shell without job control): a handler, unlike SIG_IGN, is not inherited by exec."""
    arrived = log.with_suffix(".paused")
    env = CHILD_ENV | {PAUSE_AT: point, PAUSE_FILE: str(arrived)}
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with log.open("w") as handle:
            child = subprocess.Popen(argv, env=env, stdout=handle, stderr=subprocess.STDOUT)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    return child, arrived


def test_a_pause_point_waits_only_at_the_visit_named(tmp_path, monkeypatch) -> None:
    """``OLTR_TEST_PAUSE_AT=POINT@N`` creates the pause file at the N-th visit of POINT only,
    and the pause ends by itself after ``LONGEST_PAUSE`` seconds (or when a signal raises)."""
    from oltr import pause

    arrived = tmp_path / "paused"
    monkeypatch.setattr(pause, "_reached", {})
    monkeypatch.setattr(pause, "LONGEST_PAUSE", 0.05)
    pause.pause_point("train:step")  # no variable: nothing
    monkeypatch.setenv(PAUSE_AT, "train:step@2")
    monkeypatch.setenv(PAUSE_FILE, str(arrived))
    pause.pause_point("curate:image")
    pause.pause_point("train:step")
    assert not arrived.exists()
    pause.pause_point("train:step")
    assert arrived.is_file()
    arrived.unlink()
    pause.pause_point("train:step")
    assert not arrived.exists()


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="real Fashion-MNIST missing")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_during_curation_leaves_no_partial_output(tmp_path, signum) -> None:
    out = tmp_path / "fm"
    log = tmp_path / "logs" / "curate.log"
    log.parent.mkdir()
    child, paused = _paused_child([sys.executable, "-m", "oltr.cli", "curate", "fashion-mnist",
                                   "--protocol", "fmnist_lt", "--out", str(out)], log,
                                  "curate:image")  # its first image exported, then it waits
    try:
        _wait_for(paused.exists, child, log)
        assert any((p / "images").is_dir() for p in tmp_path.glob(".fm.partial-*"))
        child.send_signal(signum)
        assert child.wait(timeout=60) == 128 + signum, log.read_text()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"]
    message = log.read_text().strip().splitlines()
    assert message == [(f"oltr curate: interrupted ({signal.Signals(signum).name}); nothing "
                        "was written; run the command again")]


def test_sigterm_during_training_keeps_the_last_epoch_and_says_resume(fmnist_small,
                                                                      tmp_path) -> None:
    run = tmp_path / "run"
    log = tmp_path / "train.log"
    argv = [sys.executable, "-m", "oltr.cli", "train", "--method", "plain", "--data",
            str(fmnist_small), "--out", str(run), "--no-progress", *TINY, "train.epochs=200"]
    child, paused = _paused_child(argv, log, "train:step@3")  # epoch 2's first step
    try:
        _wait_for(paused.exists, child, log)
        assert "[main] epoch 1/200" in log.read_text()
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert log.read_text().strip().splitlines()[-1] == (
        "oltr train: interrupted (SIGTERM); rerun it with --resume to continue from the last "
        "checkpoint")
    assert (run / "main" / "checkpoint.pt").is_file()
    assert "[main] epoch 2/200" not in log.read_text()  # it stopped within the epoch
    assert not list(run.rglob("*.tmp-oltr-*"))  # the writes in progress were cleaned up
    assert (run / MARKER).is_file()

"""One process of a torchrun-launched test (tests/test_distributed.py).

``ddp_worker.py LOG_DIR loaders DATA`` — build the training loaders of a stage on this rank and
write the (position, index) stream each rank draws in epoch 0 to ``LOG_DIR/stream-RANK.json``.

``ddp_worker.py LOG_DIR train ARGS…`` — run ``oltr train ARGS…`` with every file write
(oltr.io.atomic_write) and directory creation recorded in ``LOG_DIR/writes-RANK.txt``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

log_dir, mode, *rest = sys.argv[1:]
rank = os.environ["RANK"]
log_dir = Path(log_dir)

import oltr.io

writes: list[str] = []
original_write = oltr.io.atomic_write


def recording_write(path, write):
    writes.append(str(path))
    return original_write(path, write)


oltr.io.atomic_write = recording_write
original_mkdir = os.mkdir


def recording_mkdir(path, *args, **kwargs):
    writes.append(f"mkdir {path}")
    return original_mkdir(path, *args, **kwargs)


os.mkdir = recording_mkdir

if mode == "loaders":
    from oltr.config import load_config, stage_config
    from oltr.data import load_benchmark
    from oltr.runtime import init_runtime, shutdown_runtime
    from oltr.train.loaders import build_train_loader

    runtime = init_runtime("cpu")
    streams = {}
    for sampler in ("instance", "class_aware"):
        cfg = stage_config(load_config("plain", overrides=[
            "train.batch_size=32", f"train.sampler={sampler}", "device=cpu"]), "main")
        loader = build_train_loader(load_benchmark(rest[0]), cfg, runtime)
        loader.set_epoch(0)
        positions, indices = loader.sampler.stream()
        streams[sampler] = {"positions": positions.tolist(), "indices": indices.tolist(),
                            "batch": loader.batch_size if hasattr(loader, "batch_size") else None}
    (log_dir / f"stream-{rank}.json").write_text(json.dumps(streams))
    shutdown_runtime(runtime)
else:
    from oltr.cli import main

    code = main(["train", *rest])
    (log_dir / f"writes-{rank}.txt").write_text("\n".join(writes) + "\n")
    sys.exit(code)

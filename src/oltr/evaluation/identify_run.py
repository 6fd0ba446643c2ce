"""Face identification with a trained run, `oltr identify` (paper Tab. 4: MS1M-LT → MegaFace).

The run's network embeds every image as its direct feature ``v_direct`` (the ``features``
output of :class:`oltr.models.OLTRNetwork`, the embedding the memory and the classifier read;
the 512-d face embedding of the ms1m_lt presets), with the evaluation transform the run was
trained with. The embeddings are streamed into ``.npy`` files (one row per image, float32,
written batch by batch through ``numpy.lib.format.open_memmap``: a million distractors never
sit in memory) and compared by :mod:`oltr.evaluation.identification`, which streams them in
blocks (docs/identification.md has the protocol: hits, ties, gallery modes, pseudo-shot
groups, attributes).

Inputs:

- **probes** and **gallery**: split files ``path identity`` (identities are integers; paths
  relative to the file's folder, or to ``--image-root``); without a gallery the probes are
  their own gallery, each left out of its own search (FaceScrub in MegaFace);
- **distractors**: a folder of images (searched recursively) or a split file (labels ignored);
- **pseudo-shots** (paper §4: the number of training images whose similarity to the probe is
  above 0.7): from the run's own embeddings of its training split (``--data``, default the
  benchmark the run was trained on), or from a reference model's embeddings of the probes and
  of the training set (``--reference-embeddings PROBES TRAIN``: ``.npy`` / ``.safetensors``,
  the paper's ArcFace features), or none (``--no-pseudo-shots``);
- **attributes**: a tab-separated file ``identity<TAB>gender`` (docs/identification.md).

The report (JSON) is the identification result (``rank1``, ``groups``, ``attributes``, …) plus
what produced it: the run, stage and sha256 of the weights, the embedding, and the inputs.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oltr.data import load_benchmark
from oltr.data.datasets import ImageListDataset
from oltr.data.paths import check_image_paths
from oltr.data.splits import read_split_lines
from oltr.errors import InputError
from oltr.evaluation.external_open_sets import open_set_entries
from oltr.evaluation.identification import DEFAULT_THRESHOLD, IdentificationProtocol
from oltr.inference import forward_split, load_model
from oltr.io import atomic_write_text
from oltr.ownership import check_report_output
from oltr.run import RunDir
from oltr.runtime import init_runtime

IDENTIFY_REPORT_VERSION = 1
REPORT_KIND = "identification"
LABEL_FILES = {"probes": "probe_labels.npy", "gallery": "gallery_labels.npy"}
EMBEDDING = ("v_direct: the network's direct feature (its 'features' output), L2-normalised "
             "for the cosine similarity")


def read_identities(spec: str | Path, image_root: str | Path | None, what: str
                    ) -> tuple[list[tuple[str, int]], Path, Path]:
    """A probe or gallery list: a split file ``path identity`` (identities >= 0). Returns its
    entries, the root its paths are relative to (``image_root``, else the file's folder) and
    the file. The user names the file, so paths may be absolute or contain ``..``. InputError
    naming the file (and line) for anything else, or for a folder."""
    path = Path(spec).expanduser()
    if path.is_dir():
        raise InputError(f"the {what} must be a split file ('path identity' per line), not a "
                         "folder", path=path)
    if not path.is_file():
        raise InputError(f"{what} list not found", path=path)
    entries, lines = read_split_lines(path, allow_open=False, allow_outside_root=True)
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    if not root.is_dir():
        raise InputError("image root not found", path=root)
    check_image_paths({what: entries}, {what: lines}, {what: path}, root,
                      allow_outside_root=True)
    return entries, root, path


def read_distractors(spec: str | Path) -> tuple[list[tuple[str, int]], Path, Path | None]:
    """Distractors: a folder of images or a split file (labels ignored), as an external open
    set (`oltr.evaluation.external_open_sets.open_set_entries`)."""
    return open_set_entries(spec)


@torch.no_grad()
def embed_to_file(
    net: torch.nn.Module, dataset: ImageListDataset, data_cfg: dict[str, Any],
    out_path: Path, *, device: torch.device, batch_size: int, num_workers: int,
    amp: str = "off", channels_last: bool = True,
) -> Path:
    """Write the direct features of every image of ``dataset`` (in order) to ``out_path``, a
    float32 ``.npy`` of shape (N, d), batch by batch (``open_memmap``: bounded memory). The
    images go through the model's evaluation transform, read by files (never decoded whole
    into memory)."""
    cfg = {"data": data_cfg | {"loader": "files", "num_workers": num_workers},
           "eval": {"batch_size": batch_size, "amp": amp},
           "train": {"channels_last": channels_last}}
    dim = int(net.feature_dim)
    array = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32,
                                      shape=(len(dataset), dim))
    row = 0

    def write(batch: dict[str, np.ndarray], rows: np.ndarray = array) -> None:
        nonlocal row
        block = batch["features"]
        rows[row:row + len(block)] = block
        row += len(block)

    forward_split(net, dataset, cfg, device=device, keys=("features",), sink=write)
    assert row == len(dataset)
    array.flush()
    del array
    return out_path


def _dataset(entries: list[tuple[str, int]], root: Path, source_file: Path | None,
             channels: int) -> ImageListDataset:
    return ImageListDataset(entries, root, source_file=source_file,
                            mode="L" if channels == 1 else "RGB")


def _training_data(run: RunDir, data: str | Path | None) -> Path:
    """The benchmark the run trained on (``run.json``'s ``data``) unless ``data`` is given;
    InputError when neither names one."""
    if data is not None:
        return Path(data).expanduser()
    if run.data_dir is not None:
        return run.data_dir
    raise InputError("pseudo-shots need the training images: pass --data (the benchmark the "
                     "run was trained on), --reference-embeddings or --no-pseudo-shots",
                     path=run.path)


def identify_run(
    run_dir: str | Path,
    probes: str | Path,
    *,
    gallery: str | Path | None = None,
    distractors: str | Path | None = None,
    image_root: str | Path | None = None,
    data: str | Path | None = None,
    reference_embeddings: tuple[str | Path, str | Path] | None = None,
    pseudo_shots: bool = True,
    attributes: str | Path | None = None,
    gallery_mode: str = "all",
    ties: str = "miss",
    threshold: float = DEFAULT_THRESHOLD,
    device: str = "auto",
    batch_size: int | None = None,
    embeddings_dir: str | Path | None = None,
    output: str | Path | None = None,
) -> dict[str, Any]:
    """Identification report of a trained run (see the module docstring); written to
    ``output`` if given (an existing file there must be an oltr report). ``embeddings_dir``
    keeps the embeddings (``probes.npy``, ``probe_labels.npy``, ``gallery.npy``, …); by
    default they go to a temporary folder removed at the end. InputError for bad input, before
    any image is embedded where it can be checked earlier."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    if output is not None:
        check_report_output(output)
    protocol = IdentificationProtocol(gallery_mode=gallery_mode, ties=ties,
                                      threshold=threshold)  # checks the settings
    run = RunDir(run_dir)
    stage_cfg = run.stage_config()
    stage_dir = run.final_stage()
    sets, train_data = _image_sets(run, stage_cfg, probes, gallery=gallery,
                                   distractors=distractors, image_root=image_root, data=data,
                                   reference_embeddings=reference_embeddings,
                                   pseudo_shots=pseudo_shots)
    _check_options(attributes, batch_size, embeddings_dir)

    runtime = init_runtime(device)
    net, info = load_model(stage_dir, runtime.device)
    data_cfg = dict(info["data"])
    with tempfile.TemporaryDirectory(prefix="oltr-identify-") as scratch:
        folder = Path(embeddings_dir).expanduser() if embeddings_dir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        files = {name: _embed_set(net, name, entries, root, source_file, folder,
                                  data_cfg=data_cfg, stage_cfg=stage_cfg, device=runtime.device,
                                  batch_size=batch_size or stage_cfg["eval"]["batch_size"])
                 for name, (entries, root, source_file) in sets.items()}
        labels = {name: np.array([label for _, label in sets[name][0]], dtype=np.int64)
                  for name in ("probes", "gallery") if name in sets}
        shot_probes, train_embeddings = _shot_sources(reference_embeddings, files)
        protocol.device = runtime.device
        result = protocol.evaluate(
            files["probes"], labels["probes"],
            gallery=files.get("gallery"), gallery_labels=labels.get("gallery"),
            distractors=files.get("distractors"), train=train_embeddings,
            shot_probes=shot_probes, attributes=attributes)
    inputs = _inputs_record(sets, reference_embeddings, train_data, attributes)
    report: dict[str, Any] = {
        "report_version": IDENTIFY_REPORT_VERSION,
        "kind": REPORT_KIND,
        "run": str(run_dir),
        "stage": info["stage"],
        "method": stage_cfg.get("method"),
        "weights": {"stage": info["stage"], "epoch": info.get("epoch"),
                    "sha256": info["weights_sha256"]},
        "embedding": EMBEDDING,
        "embedding_dim": int(net.feature_dim),
        "embeddings_dir": None if embeddings_dir is None else str(embeddings_dir),
        "inputs": inputs,
        **result,
        "seconds": time.perf_counter() - started,
    }
    if output is not None:
        output = Path(output).expanduser()
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    return report


def _check_options(attributes: str | Path | None, batch_size: int | None,
                   embeddings_dir: str | Path | None) -> None:
    """Refuse a missing attribute file, a batch size below 1 and an ``embeddings_dir`` that
    holds something (nothing there is overwritten), before any image is embedded."""
    if attributes is not None and not Path(attributes).expanduser().is_file():
        raise InputError("attribute file not found", path=attributes)
    if batch_size is not None and batch_size < 1:
        raise InputError("--batch-size must be >= 1", value=batch_size)
    if embeddings_dir is not None:
        kept = Path(embeddings_dir).expanduser()
        if kept.exists() and (not kept.is_dir() or any(kept.iterdir())):
            raise InputError("--embeddings-dir must be a new or empty folder (nothing there is "
                             "overwritten)", path=kept)


def _shot_sources(reference_embeddings: tuple[str | Path, str | Path] | None,
                  files: dict[str, Path]) -> tuple[Path | None, Path | None]:
    """``(shot_probes, train)`` embeddings for the pseudo-shot counts: the reference model's
    pair when given, else the trained model's own train embeddings (or none)."""
    if reference_embeddings is not None:
        shot_probes, train = (Path(p).expanduser() for p in reference_embeddings)
        return shot_probes, train
    return None, files.get("train")


def _image_sets(
    run: RunDir, stage_cfg: dict[str, Any], probes: str | Path, *,
    gallery: str | Path | None, distractors: str | Path | None,
    image_root: str | Path | None, data: str | Path | None,
    reference_embeddings: tuple[str | Path, str | Path] | None, pseudo_shots: bool,
) -> tuple[dict[str, tuple[list[tuple[str, int]], Path, Path | None]], Path | None]:
    """The image sets to embed — probes, gallery, distractors and (for pseudo-shots from the
    run's own embeddings) the training split — as (entries, image root, split file), and the
    benchmark the training split comes from (None without)."""
    probe_entries, probe_root, probe_file = read_identities(probes, image_root, "probes")
    sets: dict[str, tuple[list[tuple[str, int]], Path, Path | None]] = {
        "probes": (probe_entries, probe_root, probe_file)}
    if gallery is not None:
        sets["gallery"] = read_identities(gallery, image_root, "gallery")
    if distractors is not None:
        sets["distractors"] = read_distractors(distractors)
    if reference_embeddings is not None and not pseudo_shots:
        raise InputError("--reference-embeddings give pseudo-shots; drop --no-pseudo-shots")
    train_data = None
    if pseudo_shots and reference_embeddings is None:
        train_data = _training_data(run, data)
        bench = load_benchmark(train_data, image_root=stage_cfg["data"]["image_root"],
                               allow_outside_root=stage_cfg["data"]["allow_outside_root"])
        train = bench.dataset("train")
        sets["train"] = (train.entries, train.image_root, train.source_file)
    return sets, train_data


def _embed_set(net: torch.nn.Module, name: str, entries: list[tuple[str, int]], root: Path,
               source_file: Path | None, folder: Path, *, data_cfg: dict[str, Any],
               stage_cfg: dict[str, Any], device: torch.device, batch_size: int) -> Path:
    """Embed one image set into ``folder/<name>.npy`` (and its labels beside it, for the probes
    and the gallery); return the embeddings' file."""
    dataset = _dataset(entries, root, source_file, data_cfg["channels"])
    print(f"embedding {len(dataset)} {name} images …", file=sys.stderr, flush=True)
    path = embed_to_file(net, dataset, data_cfg, folder / f"{name}.npy", device=device,
                         batch_size=batch_size, num_workers=stage_cfg["data"]["num_workers"],
                         amp=stage_cfg["eval"]["amp"],
                         channels_last=stage_cfg["train"]["channels_last"])
    if name in LABEL_FILES:
        np.save(folder / LABEL_FILES[name],
                np.array([label for _, label in entries], dtype=np.int64))
    return path


def _inputs_record(sets: dict[str, tuple[list[tuple[str, int]], Path, Path | None]],
                   reference_embeddings: tuple[str | Path, str | Path] | None,
                   train_data: Path | None, attributes: str | Path | None) -> dict[str, Any]:
    """The report's ``inputs``: each image set (file, root, number of images), where the
    pseudo-shots came from, and the attribute file."""
    inputs: dict[str, Any] = {
        name: {"file": None if source is None else str(source), "root": str(root),
               "images": len(entries)}
        for name, (entries, root, source) in sets.items() if name != "train"}
    if reference_embeddings is not None:
        inputs["pseudo_shots"] = {"reference_embeddings": {
            "probes": str(reference_embeddings[0]), "train": str(reference_embeddings[1])}}
    elif train_data is not None:
        inputs["pseudo_shots"] = {"model_embeddings_of_train": str(train_data),
                                  "images": len(sets["train"][0])}
    else:
        inputs["pseudo_shots"] = None
    if attributes is not None:
        inputs["attributes"] = str(attributes)
    return inputs

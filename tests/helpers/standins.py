"""Generated stand-ins for the paper's four benchmarks: tiny JPEGs in the file layout of the
real data, so every command of docs/reproduction.md runs end to end where the images are not.

- ImageNet: ``train/<wnid>/<wnid>_<n>.JPEG`` and ``val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG``;
  the published ImageNet-LT directory: ``ImageNet_LT_{train,val,test}.txt`` (paths relative
  to the ImageNet folder, ``path label``) and ``ImageNet_LT_open.txt`` with its
  ``ImageNet_LT_open/`` image folder beside it.
- Places365: ``data_256/<letter>/<class>/<8 digits>.jpg`` and ``val_256/Places365_val_<8
  digits>.jpg`` (flat) for the published Places-LT lists; ``places365_standard/train/<class>/``
  and ``val/<class>/`` (the "easy directory structure" download) for re-curation.
- MS1M-ArcFace unpacked into identity folders ``<id>/<n>.jpg``; FaceScrub probes
  ``facescrub/<name>/<n>.jpg`` listed in ``facescrub.txt`` (``path identity``), MegaFace
  distractors in a flat folder, a gender attribute file.
- SUN397: ``<letter>/<class>/sun_<16 letters>.jpg`` (some classes two folders deep, as
  ``b/bakery/shop``), ``ClassName.txt`` and path-only SUN-LT lists (``/a/abbey/sun_….jpg``).

Each image is one colour per class plus noise, 32 × 32 px, so a few steps can learn something;
nothing here is the real data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32


def image(path: Path, label: int, index: int, *, size: int = SIZE) -> Path:
    """A ``size``-px RGB JPEG (or PNG by suffix): class colour ``label`` + noise seeded by both."""
    rng = np.random.default_rng(1000 * label + index)
    hue = np.array([(37 * label) % 256, (91 * label + 60) % 256, (153 * label + 120) % 256])
    pixels = np.clip(hue + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def _write_published_splits(directory: Path, prefix: str, **splits: list[str]) -> None:
    """``directory/<prefix>_<split>.txt`` for each split (the published LT lists' names)."""
    for split, lines in splits.items():
        _write(directory / f"{prefix}_{split}.txt", lines)


# --------------------------------------------------------------------------- ImageNet-LT
WNIDS = [f"n{1440764 + 1000 * k:08d}" for k in range(8)]


def imagenet(root: Path, *, classes: int = 6, train: int = 16, val: int = 3) -> Path:
    """``root/train/<wnid>/<wnid>_<n>.JPEG`` (``train`` per class) and
    ``root/val/<wnid>/ILSVRC2012_val_<seq>.JPEG`` (``val`` per class)."""
    seq = 0
    for label, wnid in enumerate(WNIDS[:classes]):
        for n in range(train):
            image(root / "train" / wnid / f"{wnid}_{10026 + n}.JPEG", label, n)
        for n in range(val):
            seq += 1
            image(root / "val" / wnid / f"ILSVRC2012_val_{seq:08d}.JPEG", label, 100 + n)
    return root


def imagenet_lt(directory: Path, imagenet_root: Path, *, counts: tuple[int, ...] = (12, 6, 4, 3),
                val: int = 2, open_images: int = 6) -> Path:
    """The published ImageNet-LT directory over an `imagenet` stand-in: class k keeps
    ``counts[k]`` train images, ``val`` more go to val, every val image of the class to test;
    ``open_images`` images of an unseen wnid in ``ImageNet_LT_open/`` (lines without a leading
    '/')."""
    train_lines, val_lines, test_lines = [], [], []
    for label, count in enumerate(counts):
        wnid = WNIDS[label]
        names = sorted(p.name for p in (imagenet_root / "train" / wnid).iterdir())
        train_lines += [f"train/{wnid}/{name} {label}" for name in names[:count]]
        val_lines += [f"train/{wnid}/{name} {label}" for name in names[count:count + val]]
        test_lines += [f"val/{wnid}/{p.name} {label}"
                       for p in sorted((imagenet_root / "val" / wnid).iterdir())]
    open_lines = []
    for n in range(open_images):
        name = f"n09999999_{n + 1}.JPEG"
        image(directory / "ImageNet_LT_open" / name, 50, n)
        open_lines.append(f"{name} -1")
    _write_published_splits(directory, "ImageNet_LT", train=train_lines, val=val_lines,
                            test=test_lines, open=open_lines)
    return directory


# --------------------------------------------------------------------------- Places-LT
PLACES_CLASSES = ["airfield", "alley", "bakery/shop", "canyon", "church/indoor", "desert/sand"]


def places365(root: Path, *, classes: int = 6, train: int = 16, val: int = 3) -> Path:
    """``root/data_256/<letter>/<class>/<8 digits>.jpg`` and flat ``root/val_256/
    Places365_val_<8 digits>.jpg`` (the non-easy download), plus ``root/labels_val.txt``
    naming each val image's class index (this helper's, not a Places file)."""
    seq = 0
    labels = []
    for label, name in enumerate(PLACES_CLASSES[:classes]):
        for n in range(train):
            image(root / "data_256" / name[0] / name / f"{n + 1:08d}.jpg", label, n)
        for n in range(val):
            seq += 1
            image(root / "val_256" / f"Places365_val_{seq:08d}.jpg", label, 100 + n)
            labels.append(f"Places365_val_{seq:08d}.jpg {label}")
    _write(root / "labels_val.txt", labels)
    return root


def places_lt(directory: Path, places_root: Path, *, counts: tuple[int, ...] = (12, 8, 5, 3),
              val: int = 2, open_images: int = 6) -> Path:
    """The published Places-LT directory over a `places365` stand-in; its open list writes
    each path with a leading '/' (the form the original loader joins as ``root + line``)."""
    train_lines, val_lines = [], []
    for label, count in enumerate(counts):
        name = PLACES_CLASSES[label]
        files = sorted((places_root / "data_256" / name[0] / name).iterdir())
        train_lines += [f"data_256/{name[0]}/{name}/{p.name} {label}" for p in files[:count]]
        val_lines += [f"data_256/{name[0]}/{name}/{p.name} {label}"
                      for p in files[count:count + val]]
    test_lines = []
    for line in (places_root / "labels_val.txt").read_text().splitlines():
        file_name, label = line.split()
        if int(label) < len(counts):
            test_lines.append(f"val_256/{file_name} {label}")
    open_lines = []
    for n in range(open_images):
        name = f"Places365_test_{n + 1:08d}.jpg"
        image(directory / "Places_LT_open" / name, 60, n)
        open_lines.append(f"/{name} -1")
    _write_published_splits(directory, "Places_LT", train=train_lines, val=val_lines,
                            test=test_lines, open=open_lines)
    return directory


def places365_standard(root: Path, *, classes: int = 6, train: tuple[int, ...] = (16, 15, 14,
                                                                                    14, 13, 12),
                       val: int = 3) -> Path:
    """The "easy directory structure" download: ``root/train/<class>/`` and
    ``root/val/<class>/`` (class folders named without the letter level)."""
    for label, name in enumerate(PLACES_CLASSES[:classes]):
        flat = name.replace("/", "-")
        for n in range(train[label]):
            image(root / "train" / flat / f"{n + 1:08d}.jpg", label, n)
        for n in range(val):
            image(root / "val" / flat / f"Places365_val_{label * 100 + n + 1:08d}.jpg", label,
                  100 + n)
    return root


def resnet_state_dict(path: Path, backbone: str, width: int) -> Path:
    """A torchvision-style ResNet state dict (random weights, with an ``fc.*`` head that the
    loader must ignore) for ``model.pretrained_path``: what a user saves from torchvision."""
    import torch

    from oltr.models.backbones import create_backbone

    state = create_backbone(backbone, width=width).state_dict()
    state["fc.weight"] = torch.zeros(1000, width * 8 * 4)
    state["fc.bias"] = torch.zeros(1000)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


# --------------------------------------------------------------------------- MS1M-LT / MegaFace
def ms1m(root: Path, sizes: tuple[int, ...] = (24, 16, 10, 6, 3, 1)) -> Path:
    """MS1M-ArcFace unpacked into identity folders: ``root/<id>/<n>.jpg``, ``sizes[i]`` images
    of identity i."""
    for identity, size in enumerate(sizes):
        for n in range(size):
            image(root / f"{identity}" / f"{n}.jpg", identity, n)
    return root


def megaface(root: Path, *, identities: int = 4, per_identity: int = 3,
             distractors: int = 8) -> dict[str, Path]:
    """FaceScrub probes (``root/facescrub/<name>/<n>.jpg`` listed in ``root/facescrub.txt``:
    ``path identity``), MegaFace distractors (``root/distractors/<n>.jpg``) and
    ``root/facescrub_gender.tsv`` (``identity<TAB>gender``)."""
    lines, genders = [], ["identity\tgender"]
    for identity in range(identities):
        name = f"person_{identity}"
        for n in range(per_identity):
            image(root / "facescrub" / name / f"{n}.jpg", 20 + identity, n)
            lines.append(f"facescrub/{name}/{n}.jpg {identity}")
        genders.append(f"{identity}\t{'female' if identity % 2 else 'male'}")
    for n in range(distractors):
        image(root / "distractors" / f"{n:06d}.jpg", 40 + n % 5, n)
    return {"probes": _write(root / "facescrub.txt", lines),
            "distractors": root / "distractors",
            "attributes": _write(root / "facescrub_gender.tsv", genders)}


# --------------------------------------------------------------------------- SUN-LT
SUN_CLASSES = ["a/abbey", "a/airport_terminal", "b/bakery/shop", "c/canyon", "c/church/indoor"]


def sun397(root: Path, *, per_class: int = 14) -> Path:
    """``root/<letter>/<class>/sun_<16 letters>.jpg``, ``per_class`` images per class."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    for label, name in enumerate(SUN_CLASSES):
        for n in range(per_class):
            code = "".join(letters[(7 * label + 3 * n + k) % 26] for k in range(16))
            image(root / name / f"sun_{code}.jpg", label, n)
    return root


def sun_lt(directory: Path, sun_root: Path, *, counts: tuple[int, ...] = (8, 5, 3, 2, 1),
           test: int = 3) -> Path:
    """SUN-LT lists in SUN397's partition format (path only, a leading '/', the class is the
    folder) with SUN397's ``ClassName.txt``: ``counts[k]`` train and ``test`` test images of
    class k, the rest of each class left unused."""
    train, tests = [], []
    for label, name in enumerate(SUN_CLASSES):
        files = sorted(p.name for p in (sun_root / name).iterdir())
        train += [f"/{name}/{file}" for file in files[:counts[label]]]
        tests += [f"/{name}/{file}" for file in files[counts[label]:counts[label] + test]]
    _write(directory / "ClassName.txt", [f"/{name}" for name in SUN_CLASSES])
    _write(directory / "SUN-LT_train.txt", train)
    _write(directory / "SUN-LT_test.txt", tests)
    return directory

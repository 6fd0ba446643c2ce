"""Every bad input, one row each: the error names the file, line and value (issue 5).

Rows run the real entry point (split-file reader, benchmark loader, dataset, config resolver,
curation, trainer with --resume, evaluation, prediction) on a small generated benchmark, or on a
copy of a tiny run trained once on the real Fashion-MNIST-LT fixture, tampered with.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from oltr.cli import main
from oltr.config import load_config
from oltr.data import curate, load_benchmark, parse_source, read_idx
from oltr.errors import InputError
from oltr.evaluation.closed_open import evaluate_run
from oltr.pipeline import train_run

TRAINED = ["model.width=8", "train.batch_size=32", "train.max_steps_per_epoch=2",
           "eval.batch_size=256", "train.epochs=1"]
SPLITS = {
    "train": "i/t0.png 0\ni/t1.png 1\ni/t2.png 2\ni/t3.png 0\n",
    "val": "i/v0.png 0\ni/v1.png 2\n",
    "test": "i/s0.png 1\n",
    "open": "i/o0.png -1\n",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_run(fmnist_small, tmp_path_factory) -> Path:
    """A one-epoch tiny plain run on the Fashion-MNIST-LT fixture (4 known classes)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_run(load_config("plain", overrides=TRAINED), fmnist_small, run, progress=False)
    finally:
        torch.set_num_threads(threads)
    return run


class Case:
    """What a row gets: a scratch directory, and (lazily) the fixture data and a trained run."""

    def __init__(self, tmp: Path, request: pytest.FixtureRequest) -> None:
        self.tmp, self.request = tmp, request

    @cached_property
    def fmnist(self) -> Path:
        return self.request.getfixturevalue("fmnist_small")

    @cached_property
    def run(self) -> Path:
        """A private copy of the trained run, free to tamper with."""
        return Path(shutil.copytree(self.request.getfixturevalue("trained_run"), self.tmp / "run"))

    def bench(self, *, classes: str | None = "a\nb\nc\n", **splits: str | None) -> Path:
        """A plain ImageNet-LT-style benchmark with real 8x8 PNGs; ``splits`` replace texts."""
        root = self.tmp / "bench"
        root.mkdir()
        texts = SPLITS | splits
        for name, text in texts.items():
            if text is not None:
                (root / f"{name}.txt").write_text(text)
        for text in SPLITS.values():
            for line in text.splitlines():
                image = root / line.split()[0]
                image.parent.mkdir(exist_ok=True)
                Image.new("L", (8, 8), 100).save(image)
        if classes is not None:
            (root / "classes.txt").write_text(classes)
        return root

    def fmnist_like(self, class_names: list[str]) -> Path:
        """The fixture's images as a plain benchmark of the first ``len(class_names)`` classes."""
        root = self.tmp / "other"
        root.mkdir()
        for folder in ("train", "test"):  # copies: a link out of the root would be refused
            shutil.copytree(self.fmnist / "images" / folder, root / folder)
        for split in ("train", "val", "test", "open"):
            lines = (self.fmnist / f"{split}.txt").read_text().splitlines()
            kept = [line for line in lines if int(line.split()[-1]) < len(class_names)]
            (root / f"{split}.txt").write_text("\n".join(kept) + "\n")
        (root / "classes.txt").write_text("\n".join(class_names) + "\n")
        return root

    def fmnist_names(self) -> list[str]:
        return (self.fmnist / "classes.txt").read_text().split()


# --------------------------------------------------------------------------- row actions
def load(**splits: str | None) -> Callable[[Case], object]:
    return lambda case: load_benchmark(case.bench(**splits))


def load_bytes(split: str, data: bytes) -> Callable[[Case], object]:
    def action(case: Case) -> None:
        root = case.bench()
        (root / f"{split}.txt").write_bytes(data)
        load_benchmark(root)
    return action


def splits_source(train: str) -> Callable[[Case], object]:
    return lambda case: parse_source(f"splits:{case.bench(train=train)}")


def load_without_classes(**splits: str | None) -> Callable[[Case], object]:
    return lambda case: load_benchmark(case.bench(classes=None, **splits))


def read_train_images(damage: Callable[[Path], object], *, skip: bool = False,
                      **splits: str) -> Callable[[Case], object]:
    def action(case: Case) -> None:
        root = case.bench(**splits)
        damage(root / "i" / "t0.png")
        bench = load_benchmark(root)
        if skip:
            bench.drop_unreadable_images(["train", "val"])
        dataset = bench.dataset("train")
        for index in range(len(dataset)):
            dataset[index]
    return action


def truncate(path: Path) -> None:
    """Cut an image in half (after making it big enough that the header survives)."""
    Image.effect_noise((64, 64), 50).save(path, format=Image.open(path).format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def config(*overrides: str) -> Callable[[Case], object]:
    return lambda case: load_config("oltr", overrides=list(overrides))


def config_file(text: str) -> Callable[[Case], object]:
    def action(case: Case) -> None:
        (case.tmp / "mine.yaml").write_text(text)
        load_config(config_file=case.tmp / "mine.yaml")
    return action


def idx(data: bytes) -> Callable[[Case], object]:
    def action(case: Case) -> None:
        (case.tmp / "images.gz").write_bytes(gzip.compress(data))
        read_idx(case.tmp / "images.gz", expected_magic=2051)
    return action


def class_tree(case: Case) -> Path:
    """A folder: source of 3 classes of 12 4x4 PNGs each."""
    for label in range(3):
        folder = case.tmp / "tree" / f"c{label}"
        folder.mkdir(parents=True)
        for i in range(12):
            Image.new("L", (4, 4), i).save(folder / f"{i}.png")
    return case.tmp / "tree"


def curate_counts(damage: Callable[[Path], object] | None = None,
                  **kwargs: object) -> Callable[[Case], object]:
    """Curate the class tree (``damage`` gets its root first) into ``out``."""
    def action(case: Case) -> None:
        tree = class_tree(case)
        if damage is not None:
            damage(tree)
        curate(f"folder:{tree}", case.tmp / "out",
               **({"max_count": 5, "min_count": 1, "val_per_class": 1, "test_per_class": 1}
                  | kwargs))
    return action


def given_with_classes(case: Case, second: str, classes: str | None = None) -> None:
    """given: lists (path label, or path only) over an image root of classes 'cat' and
    ``second``; ``classes``: a classes.txt beside the lists."""
    from oltr.data.given import curate_given
    root, lists = case.tmp / "images", case.tmp / "lists"
    for label, name in enumerate(("cat", second)):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (4, 4), 10 * label + i).save(root / name / f"{i}.png")
    lists.mkdir()
    labels = classes is not None
    for split, images in (("train", (0, 1)), ("test", (2,))):
        (lists / f"{split}.txt").write_text("".join(
            f"{name}/{i}.png" + (f" {label}" if labels else "") + "\n"
            for label, name in enumerate(("cat", second)) for i in images))
    if classes is not None:
        (lists / "classes.txt").write_text(classes)
    curate_given(lists, root, case.tmp / "out", val_per_class=1)


def load_linked(case: Case) -> None:
    """A split path that stays in the image root lexically but leaves it through a link."""
    root = case.bench(test="i/out/x.png 1\n")
    (case.tmp / "elsewhere").mkdir()
    Image.new("L", (8, 8), 1).save(case.tmp / "elsewhere" / "x.png")
    (root / "i" / "out").symlink_to(case.tmp / "elsewhere")
    load_benchmark(root)


def load_edited_manifest(edit: Callable[[dict], object]) -> Callable[[Case], object]:
    def action(case: Case) -> None:
        data = case.tmp / "curated"
        curate(f"folder:{class_tree(case)}", data, max_count=5, min_count=1, val_per_class=1,
               test_per_class=1)
        manifest = json.loads((data / "manifest.json").read_text())
        edit(manifest)
        (data / "manifest.json").write_text(json.dumps(manifest))
        load_benchmark(data)
    return action


def save_float_tiff(path: Path) -> None:
    Image.fromarray(np.array([[0.0, 2.0]], dtype=np.float32)).save(path, format="TIFF")


def write_bytes(name: str, data: bytes, then: Callable[[Case, Path], object]
                ) -> Callable[[Case], object]:
    def action(case: Case) -> None:
        root = case.bench()
        (root / name).write_bytes(data)
        then(case, root)
    return action


def resume_with_history(text: str) -> Callable[[Case], object]:
    def action(case: Case) -> None:
        (case.run / "main" / "history.jsonl").write_text(text)
        train_run(load_config("plain", overrides=TRAINED), case.fmnist, case.run, resume=True,
                  progress=False)
    return action


def evaluate_on(names: Callable[[list[str]], list[str]]) -> Callable[[Case], object]:
    return lambda case: evaluate_run(case.run, case.fmnist_like(names(case.fmnist_names())))


def resume_on_three_classes(case: Case) -> None:
    train_run(load_config("plain", overrides=TRAINED), case.fmnist_like(case.fmnist_names()[:3]),
              case.run, resume=True, progress=False)


def tampered_checkpoint(tamper: Callable[[Path], object]) -> Callable[[Case], object]:
    def action(case: Case) -> None:
        tamper(case.run / "main" / "checkpoint.pt")
        train_run(load_config("plain", overrides=TRAINED), case.fmnist, case.run, resume=True,
                  progress=False)
    return action


class RunsCode:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def pickled_code(path: Path) -> None:
    with open(path, "wb") as handle:
        pickle.dump({"format": 1, "model": RunsCode()}, handle)


def without_optimizer(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    del state["optimizer"]
    torch.save(state, path)


def wrong_shape(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["model"]["classifier.weight"] = torch.zeros(7, 3)
    torch.save(state, path)


def tampered_model(tamper: Callable[[Path], object]) -> Callable[[Case], object]:
    def action(case: Case) -> None:
        tamper(case.run / "main")
        evaluate_run(case.run, case.fmnist, open_set=False)
    return action


def edit_model_json(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def tamper(stage: Path) -> None:
        info = json.loads((stage / "model.json").read_text())
        edit(info)
        (stage / "model.json").write_text(json.dumps(info))
    return tamper


def config_file_with(text: str, *overrides: str) -> Callable[[Case], object]:
    def action(case: Case) -> None:
        (case.tmp / "mine.yaml").write_text(text)
        load_config(config_file=case.tmp / "mine.yaml", overrides=list(overrides))
    return action


# 551 bytes: 9 aliases of 9 aliases … of 9 'lol's, 9^9 ≈ 3.9e8 values once expanded (issue 9).
YAML_BOMB = "data:\n  mean: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n" + "".join(
    f"  x{i}: &{b} [*{a},*{a},*{a},*{a},*{a},*{a},*{a},*{a},*{a}]\n"
    for i, (a, b) in enumerate(zip("abcdefgh", "bcdefghi"))) + "  std: *i\n"


def fresh_run(method: str, *overrides: str) -> Callable[[Case], object]:
    """Train a fresh run into ``out`` (a failure must leave no ``out`` behind)."""
    return lambda case: train_run(load_config(method, overrides=[*TRAINED, *overrides]),
                                  case.fmnist, case.tmp / "out", progress=False)


def resume_with(*overrides: str, history: str | None = None) -> Callable[[Case], object]:
    def action(case: Case) -> None:
        if history is not None:
            (case.run / "main" / "history.jsonl").write_text(history)
        train_run(load_config("plain", overrides=[*TRAINED, *overrides]), case.fmnist, case.run,
                  resume=True, progress=False)
    return action


def init_from_foreign_weights(case: Case) -> None:
    weights = case.tmp / "foreign.safetensors"
    save_file({"backbone.x": torch.zeros(2)}, weights)
    fresh_run("plain", f"train.init_from={weights}")(case)


ROWS = [
    # split files and benchmark directories
    ("malformed line", load(train="i/t0.png 0\ni/t1.png\n"),
     r"train\.txt:2: expected 'path label' \(value: 'i/t1\.png'\)"),
    ("label not an integer", load(val="i/v0.png zero\n"),
     r"val\.txt:1: label is not an integer \(value: 'zero'\)"),
    ("label in non-ASCII digits", load(val="i/v0.png ٣\n"),
     r"val\.txt:1: label is not an integer \(value: '٣'\)"),
    ("label too large", load(val="i/v0.png 99999999999999999999\n"),
     r"val\.txt:1: label is too large"),
    ("label out of range", load(val="i/v0.png 0\ni/v1.png 3\n"),
     r"val\.txt:2: label out of range: there are 3 classes \(labels 0\.\.2\) \(value: '3'\)"),
    ("label below -1", load(test="i/s0.png -2\n"), r"test\.txt:1: label below -1"),
    ("labels not contiguous", load_without_classes(train="i/t0.png 0\ni/t2.png 2\n"),
     r"train\.txt: labels must be contiguous from 0 .*label 1 has no train image but 2 does"),
    ("class without train images", load(train="i/t0.png 0\ni/t2.png 2\n"),
     r"train\.txt: class 1 \('b'\) has no train image"),
    ("open label in train", load(train="i/t0.png 0\ni/t1.png -1\ni/t2.png 2\n"),
     r"train\.txt:2: open label -1 is not allowed in this split \(value: '-1'\)"),
    ("known label in open split", load(open="i/o0.png 1\n"),
     r"open\.txt:1: open split holds only label -1 \(value: 1\)"),
    ("path twice in a split", load(test="i/s0.png 1\n\ni/s0.png 0\n"),
     r"test\.txt:3: path listed twice \(first on line 1\) \(value: 'i/s0\.png'\)"),
    ("path in two splits", load(test="i/v1.png 2\n"),
     r"test\.txt:1: image also listed in .*val\.txt line 2; splits must not share images"),
    ("absolute path", load(train="i/t0.png 0\n/etc/passwd 1\ni/t2.png 2\n"),
     r"train\.txt:2: path leaves the image root .*allow_outside_root.* \(value: '/etc/passwd'\)"),
    ("'..' path", load(val="i/../../secret.png 0\n"),
     r"val\.txt:1: path leaves the image root .* \(value: 'i/\.\./\.\./secret\.png'\)"),
    ("empty split file", load(val="\n  \n"), r"val\.txt: split file is empty"),
    ("split file not UTF-8", load_bytes("val", "i/v0.png 0\n".encode("utf-16")),
     r"val\.txt: split file is not UTF-8"),
    ("no train split", load(train=None), r"no file matches '\*train\*\.txt'"),
    ("splits: source with '..'", splits_source("i/t0.png 0\n../x.png 1\n"),
     r"train\.txt:2: path leaves the image root"),
    ("train image respelled './' in test", load(test="./i/t0.png 0\n"),
     (r"test\.txt:1: image also listed in .*train\.txt line 1 as 'i/t0\.png'; splits must not "
      r"share images \(value: '\./i/t0\.png'\)")),
    ("train image respelled '//' in test", load(test="i//t1.png 1\n"),
     r"test\.txt:1: image also listed in .*train\.txt line 2 as 'i/t1\.png'; splits must not"),
    ("one image twice in a split, two spellings", load(val="i/v0.png 0\ni/./v0.png 0\n"),
     r"val\.txt:2: image listed twice \(first on line 1 as 'i/v0\.png': the same file\)"),
    ("split path leaves the root through a link", load_linked,
     (r"test\.txt:1: path leads outside the image root .* through a symbolic link \(to "
      r".*elsewhere/x\.png\); set data\.allow_outside_root: true .* \(value: 'i/out/x\.png'\)")),
    ("splits: source names one image twice",
     splits_source("i/t0.png 0\ni/t1.png 1\ni/t2.png 2\n./i/t0.png 0\n"),
     (r"train\.txt:4: image listed twice \(first on line 1 as 'i/t0\.png': the same file\) "
      r"\(value: '\./i/t0\.png'\)")),
    ("folder: symlink loop", curate_counts(lambda tree: (tree / "c0" / "loop").symlink_to("..")),
     r"tree/c0/loop: symbolic link loop: the link leads back to"),
    ("folder: link out of the folder",
     curate_counts(lambda tree: (tree / "c1" / "out").symlink_to(tree.parent)),
     (r"tree/c1/out: symbolic link leads outside the image root .*tree \(to .*\); pass "
      r"allow_outside_root=True \(oltr curate --allow-outside-root\)")),
    ("folder: one image in two classes",
     curate_counts(lambda tree: (tree / "c0" / "x.png").symlink_to("../c2/3.png")),
     r"tree/c2/3\.png: the same image file as .*tree/c0/x\.png"),
    ("folder class without images",
     lambda case: (case.tmp.joinpath("f", "empty").mkdir(parents=True),
                   parse_source(f"folder:{case.tmp / 'f'}")),
     r"class folder 'empty' holds no images"),
    # images
    ("missing image", read_train_images(Path.unlink),
     r"train\.txt:1: image not found: .*/i/t0\.png"),
    ("truncated PNG", read_train_images(truncate),
     r"train\.txt:1: cannot read image .*/i/t0\.png \(image file is truncated"),
    ("garbage image", read_train_images(lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\nnonsense")),
     r"train\.txt:1: cannot read image .*/i/t0\.png"),
    ("float image out of its range", read_train_images(save_float_tiff),
     (r"train\.txt:1: cannot read image .*/i/t0\.png \(mode 'F' holds values 0\.\.2; oltr "
      r"reads this mode as intensities in \[0, 1\]")),
    ("truncated image in curation", curate_counts(lambda tree: truncate(tree / "c1" / "3.png")),
     r"tree/c1/3\.png: cannot read image \(image file is truncated"),
    ("skipping empties a class",
     read_train_images(Path.unlink, skip=True, train="i/t0.png 0\ni/t1.png 1\ni/t2.png 2\n"),
     (r"train\.txt: class 0 \('a'\) has no readable train image left \(first unreadable: "
     r".*train\.txt:1: image not found")),
    ("skipping empties a split",
     read_train_images(Path.unlink, skip=True, val="i/t0.png 0\n",
                       train="i/t1.png 1\ni/t2.png 2\ni/t3.png 0\n"),
     r"val\.txt: no image of the val split is readable"),
    ("truncated IDX file", idx((2051).to_bytes(4, "big") + (3).to_bytes(4, "big") * 3 + b"x"),
     r"images\.gz: IDX file truncated: 17 bytes, header \(3, 3, 3\) needs 43"),
    ("IDX of the wrong kind", idx((2049).to_bytes(4, "big") + b"\0" * 12),
     r"images\.gz: not an IDX file of the expected kind: magic number 2049"),
    # curation
    ("profile min above max", curate_counts(max_count=3, min_count=5),
     r"invalid long-tail profile: max_count \(3\) must be >= min_count \(5\)"),
    ("class too small for the profile", curate_counts(max_count=11),
     r"class has 12 images, needs 13 \(train 11 \+ val 1 \+ test 1\)"),
    ("manifest image_root a number", load_edited_manifest(lambda m: m.update(image_root=3)),
     r"manifest\.json: manifest key 'image_root' must be a string \(a folder path\) \(value: 3\)"),
    ("manifest image_root a list", load_edited_manifest(lambda m: m.update(image_root=["a"])),
     r"manifest\.json: manifest key 'image_root' must be a string .* \(value: \['a'\]\)"),
    ("manifest class names not strings",
     load_edited_manifest(lambda m: m.update(known_classes=[1, 2])),
     r"manifest\.json: manifest key 'known_classes' must be a list of class names"),
    ("manifest seed a string", load_edited_manifest(lambda m: m.update(seed="0")),
     r"manifest\.json: manifest key 'seed' must be an integer \(value: '0'\)"),
    # text files
    ("class names not UTF-8",
     write_bytes("classes.txt", b"a\nb\xe9\nc\n", lambda case, root: load_benchmark(root)),
     (r"classes\.txt: class-name file is not UTF-8 text \(invalid continuation byte at line 2, "
      r"byte 3\)")),
    ("config file not UTF-8",
     write_bytes("mine.yaml", b"train:\n  lr: 0.1 # \xff\n",
                 lambda case, root: load_config(config_file=root / "mine.yaml")),
     r"mine\.yaml: config file is not UTF-8 text \(invalid start byte at line 2, byte 19\)"),
    ("config file with a key written twice",
     config_file("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n"),
     r"mine\.yaml:4: key 'lr' is written twice \(first on line 2\)$"),
    ("config file with a section written twice",
     config_file("train:\n  lr: 0.1\nmodel:\n  width: 8\ntrain:\n  epochs: 2\n"),
     r"mine\.yaml:5: key 'train' is written twice \(first on line 1\)$"),
    ("config file too large",
     lambda case: (case.tmp.joinpath("mine.yaml").write_bytes(b""),
                   os.truncate(case.tmp / "mine.yaml", (16 << 20) + 1),
                   load_config(config_file=case.tmp / "mine.yaml")),
     r"mine\.yaml: config file is too large \(16777217 bytes; at most 16777216\)$"),
    ("folder: a class named 'unknown'",
     curate_counts(lambda tree: (tree / "c2").rename(tree / "unknown")),
     (r"tree/unknown: class name 'unknown' is reserved: predict answers 'unknown' \(label -1\) "
      r"for a rejected image; rename the class$")),
    ("folder: a class named '-1'",
     curate_counts(lambda tree: (tree / "c0").rename(tree / "-1")),
     r"tree/-1: class name '-1' is reserved: predict answers 'unknown' \(label -1\) "),
    ("given: a class folder named 'Unknown'", lambda case: given_with_classes(case, "Unknown"),
     r"images/Unknown: class name 'Unknown' is reserved: predict answers 'unknown' "),
    ("given: classes.txt names a class '-1'",
     lambda case: given_with_classes(case, "dog", classes="cat\n-1\n"),
     r"lists: class name '-1' is reserved: predict answers 'unknown' "),
    ("folder: a FIFO named like an image",
     curate_counts(lambda tree: os.mkfifo(tree / "c1" / "x.png")),
     r"tree/c1/x\.png: cannot read image \(not a regular file: a FIFO; or curate with "),
    ("split file a FIFO",
     lambda case: ((case.bench() / "test.txt").unlink(), os.mkfifo(case.tmp / "bench" / "test.txt"),
                   load_benchmark(case.tmp / "bench")),
     r"test\.txt: split file is not a regular file \(a FIFO\)$"),
    ("history.jsonl not JSON", resume_with_history('{"epoch": 1}\n{oops\n'),
     r"history\.jsonl:2: training history line is not valid JSON"),
    # config values
    ("negative lr", config("train.lr=-0.1"),
     r"config key 'train\.lr' must be a number > 0 \(value: -0\.1\)"),
    ("epochs not an integer", config("train.epochs=2.5"),
     r"config key 'train\.epochs' must be an integer >= 0 \(value: 2\.5\)"),
    ("unknown sampler", config("stage2.train.sampler=balanced"),
     (r"config key 'stage2\.train\.sampler' must be one of instance, class_aware "
     r"\(value: 'balanced'\)")),
    ("unknown non-finite policy", config("train.nonfinite=ignore"),
     r"config key 'train\.nonfinite' must be one of stop, skip \(value: 'ignore'\)"),
    ("batch size zero", config("train.batch_size=0"),
     r"config key 'train\.batch_size' must be an integer in 1\.\.65536 \(value: 0\)"),
    ("boolean as text", config("data.skip_bad_images=maybe"),
     r"config key 'data\.skip_bad_images' must be true or false \(value: 'maybe'\)"),
    ("accept rate above 1", config("eval.accept_rate=1.5"),
     r"config key 'eval\.accept_rate' must be a number in \(0, 1\] \(value: 1\.5\)"),
    ("bad device", config("device=gpu"), r"config key 'device' must be auto, cpu, mps, cuda"),
    ("feature cache of a trained backbone", config("stage2.train.feature_cache=on"),
     (r"config key 'stage2\.train\.feature_cache': on needs train\.freeze_backbone: true "
      r"\(only a frozen part can be computed once\) \(value: 'on'\)")),
    ("feature cache word", config("train.feature_cache=yes please"),
     r"config key 'train\.feature_cache' must be one of off, on \(value: 'yes please'\)"),
    ("device decode of small images", config("data.decode=device"),
     (r"config key 'data\.decode': device decodes and augments with the imagenet preset only "
      r".* \(value: 'small'\)")),
    ("mean per channel", config("data.mean=[0.5,0.5]"),
     r"config key 'data\.mean' needs one value per channel \(data\.channels = 1\)"),
    ("number as YAML text", config_file("train:\n  lr: 1e-3\n"),
     (r"config key 'train\.lr' must be a number > 0 \(YAML 1\.1 reads 1e-3 as text: write "
     r"1\.0e-3\) \(value: '1e-3'\)")),
    ("unknown key", config("train.lrr=0.1"), r"unknown config key 'train\.lrr'"),
    ("seed beyond 2**32", config("seed=200000000000000"),
     r"config key 'seed' must be an integer in 0\.\.4294967295 \(value: 200000000000000\)"),
    ("stages not a list", config_file_with("stages: 5\n"),
     r"mine\.yaml:1: config key 'stages' must be a list of mappings.* \(value: 5\)"),
    ("stage not a mapping", config_file_with("stages: [x]\n"),
     r"mine\.yaml:1: config key 'stages' must be a list of mappings.* \(value: \['x'\]\)"),
    ("stage name leaving the run", config_file_with("stages: [{name: ../x}]\n"),
     r"mine\.yaml:1: a stage name must be a plain folder name .* \(value: '\.\./x'\)"),
    ("section not a mapping, with an override", config_file_with("train: 3\n", "train.lr=0.1"),
     r"mine\.yaml:1: config key 'train' must be a mapping \(value: 3\)"),
    ("stages set by an override", config("stages=5"),
     r"a method's stages cannot be set by an override"),
    ("YAML alias bomb", config_file_with(YAML_BOMB),
     r"mine\.yaml: YAML aliases expand to more than 100000 values"),
    ("alias bomb in an override", config("data.mean=[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,"
                                         "*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], "
                                         "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                                         "[*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]]"),
     r"cannot parse the value of override: YAML aliases expand to more than 100000 values"),
    # a trained run against other data
    ("evaluate on fewer classes", evaluate_on(lambda names: names[:3]),
     r"other: the model was trained on 4 classes but the data has 3"),
    ("evaluate on other classes", evaluate_on(lambda names: names[::-1]),
     r"other: the model was trained on the classes \['Pullover'"),
    ("resume on fewer classes", resume_on_three_classes,
     r"checkpoint\.pt: the checkpoint was written for 4 classes .* but the data has 3"),
    ("resume with another config", resume_with("train.lr=0.05"),
     (r"config\.yaml: --resume with a config that differs from the saved one: train\.lr: "
     r"0\.1 → 0\.05; resume with the same command")),
    ("resume with a damaged history", resume_with(history='{"epoch": 1}\n{"epoch": 2, "lo\n'),
     r"history\.jsonl:2: training history line is not valid JSON"),
    # a run's checks come before it creates anything (no 'out' is left)
    ("cross-key error of stage 2 before stage 1 trains",
     fresh_run("oltr", "stage2.model.meta_embedding=false"),
     (r"train\.centroid_loss needs model\.meta_embedding: true in stage 'stage2' "
     r"\(the centroids live there\) \(value: '\w+'\)")),
    ("epoch samples below the batch size", fresh_run("plain", "train.epoch_samples=10"),
     (r"train\.epoch_samples \(10\) is below train\.batch_size \(32\): every epoch would drop "
     r"its only, incomplete batch and train nothing")),
    ("mps where there is none", fresh_run("plain", "device=mps"),
     r"device 'mps' requested but MPS \(Apple GPU\) is not available \(value: 'mps'\)"),
    ("a CUDA device that is not there", fresh_run("plain", "device=cuda:99"),
     r"(CUDA is not available|no such CUDA device).* \(value: 'cuda:99'\)"),
    ("init_from weights of another model", init_from_foreign_weights,
     r"foreign\.safetensors: train\.init_from: stage-1 weights lack"),
    # untrusted checkpoint and model files
    ("pickle that runs code", tampered_checkpoint(pickled_code),
     r"checkpoint\.pt: refusing or unable to read checkpoint"),
    ("checkpoint of garbage", tampered_checkpoint(lambda p: p.write_bytes(b"\0garbage" * 9)),
     r"checkpoint\.pt: refusing or unable to read checkpoint"),
    ("foreign torch file", tampered_checkpoint(lambda p: torch.save({"w": torch.ones(2)}, p)),
     r"checkpoint\.pt: not an oltr training checkpoint \(wrong format tag\)"),
    ("checkpoint without optimiser", tampered_checkpoint(without_optimizer),
     r"checkpoint\.pt: checkpoint lacks keys \['optimizer'\] \(tampered or truncated\)"),
    ("checkpoint tensor of the wrong shape", tampered_checkpoint(wrong_shape),
     r"checkpoint\.pt: the checkpoint does not fit this model and data .*size mismatch"),
    ("weights of garbage", tampered_model(lambda s: (s / "model.safetensors").write_bytes(b"x" * 64)),
     r"model\.safetensors: cannot read weights"),
    ("weights of another tensor", tampered_model(
        lambda s: save_file({"classifier.weight": torch.zeros(2, 2)}, s / "model.safetensors")),
     r"model\.safetensors: weights do not fit the model in model\.json: .*size mismatch"),
    ("model.json not JSON", tampered_model(lambda s: (s / "model.json").write_text("{\n oops")),
     r"model\.json:2: model description is not valid JSON"),
    ("model.json lacks a key", tampered_model(edit_model_json(lambda i: i.pop("num_classes"))),
     r"model\.json: lacks key 'num_classes' \(tampered, or not written by oltr\)"),
    ("model.json names a missing tensor", tampered_model(
        edit_model_json(lambda i: i["model"].update(meta_embedding=True))),
     (r"model\.safetensors: weights do not match the model in model\.json: missing "
     r"\['meta_embedding\.")),
    ("model.json wider model", tampered_model(edit_model_json(lambda i: i["model"].update(width=16))),
     r"model\.safetensors: weights do not fit the model in model\.json: .*size mismatch"),
    ("model.json unknown backbone", tampered_model(
        edit_model_json(lambda i: i["model"].update(backbone="resnet9000"))),
     r"model\.json: describes no valid model: unknown backbone"),
    ("run.json leads out of the run", tampered_model(
        lambda s: (s.parent / "run.json").write_text('{"final_stage": "../../elsewhere"}')),
     r"run\.json: final_stage must name a stage folder of the run"),
    ("run.json not JSON", tampered_model(lambda s: (s.parent / "run.json").write_text("{")),
     r"run\.json:1: run description is not valid JSON"),
    ("model.json class names", tampered_model(edit_model_json(lambda i: i["class_names"].pop())),
     r"model\.json: 3 class names for num_classes 4"),
    ("model.json data mean not numbers",
     tampered_model(edit_model_json(lambda i: i["data"].update(mean=["x"]))),
     r"model\.json: key 'data\.mean' must be a list of numbers \(value: \['x'\]\)"),
    ("model.json std per channel", tampered_model(edit_model_json(lambda i: i["data"].update(
        std=[0.3, 0.3]))),
     r"model\.json: key 'data\.std' needs one value per channel \(data\.channels = 1\)"),
]


@contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail (rather than hang the suite) if the block takes longer: a FIFO opened for reading
    waits for a writer forever."""
    def expire(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s (blocked on a FIFO?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(("action", "message"), [pytest.param(a, m, id=i) for i, a, m in ROWS])
def test_bad_input_is_named(action, message, tmp_path, request, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=message), within(120):
        action(Case(tmp_path, request))
    assert not (tmp_path / "PWNED").exists()  # nothing in a tampered file ran
    assert not (tmp_path / "out").exists()  # a failed curation leaves nothing


def train_argv(case: Case, *, damage: Callable[[Path], object],
               extra: Sequence[str] = ()) -> list[str]:
    """``oltr train`` on the small benchmark with 2 DataLoader workers (ImageNet-LT's presets
    use 8), after ``damage``; every train image is in a batch (batch size 2, 4 images)."""
    root = case.bench()
    damage(root)
    return ["train", "--method", "plain", "--data", str(root), "--out", str(case.tmp / "r"),
            "--no-progress", "model.width=8", "train.batch_size=2", "train.epochs=1",
            "data.num_workers=2", *extra]


def predict_mixed_sizes(case: Case) -> list[str]:
    tamper = edit_model_json(lambda info: info["data"].update(transform="none"))
    tamper(case.run / "main")
    first = next((case.fmnist / "images" / "test").glob("*.png"))
    Image.new("L", (30, 28)).save(case.tmp / "copy.png")
    return ["predict", str(case.run), str(first), str(case.tmp / "copy.png"), "--open-threshold", "0.5"]


def predict_with_rule(edit: Callable[[dict], object]) -> Callable[[Case], list[str]]:
    """Edit the run's decision rule (decision.json, saved when it was trained), then predict."""
    def argv(case: Case) -> list[str]:
        path = case.run / "decision.json"
        rule = json.loads(path.read_text())
        edit(rule)
        path.write_text(json.dumps(rule))
        return ["predict", str(case.run), str(next((case.fmnist / "images").rglob("*.png")))]
    return argv


def tiny_train_argv(case: Case, *extra: str, out: Path | None = None) -> list[str]:
    return ["train", "--method", "plain", "--data", str(case.fmnist), "--out",
            str(out or case.tmp / "out"), "--no-progress", *TRAINED, *extra]


def a_file(case: Case, *parts: str) -> Path:
    """``case.tmp/notes.txt`` (a user's file), joined with ``parts``."""
    (case.tmp / "notes.txt").write_text("mine")
    return case.tmp.joinpath("notes.txt", *parts)


CLI_ROWS = [
    ("train with a negative lr", lambda case: ["train", "--method", "plain", "--data",
                                               str(case.tmp), "--out", str(case.tmp / "r"),
                                               "train.lr=-1"],
     "oltr train: error: config key 'train.lr' must be a number > 0 (value: -1)"),
    ("amp=off passes (YAML's false), the missing data is named", lambda case: ["train", "--method", "plain", "--data",
                                                        str(case.tmp / "none"), "--out",
                                                        str(case.tmp / "r"), "train.amp=off"],
     "benchmark directory not found"),
    ("evaluate with a threshold above 1",
     lambda case: ["evaluate", str(case.run), "--data", str(case.fmnist), "--open",
                   "--threshold", "1.5"],
     "oltr evaluate: error: a probability threshold must lie in [0, 1] (value: 1.5)"),
    ("a bad image in a DataLoader worker", lambda case: train_argv(
        case, damage=lambda root: truncate(root / "i" / "t0.png")),
     ("oltr train: error: {bench}/train.txt:1: cannot read image {bench}/i/t0.png (image file "
      "is truncated")),
    ("mixed image sizes, no resizing, in workers", lambda case: train_argv(
        case, damage=lambda root: Image.new("L", (10, 8)).save(root / "i" / "t2.png"),
        extra=["data.transform=none"]),
     "need a resizing transform (data.transform: small or imagenet, not none)"),
    ("predict mixed image sizes without resizing", predict_mixed_sizes,
     "copy.png is 30x28 pixels, 1 channel, but "),
    ("--open-set with an empty path",
     lambda case: ["evaluate", str(case.run), "--data", str(case.fmnist), "--open",
                   "--open-set", "far="],
     "oltr evaluate: error: --open-set: an empty path (an unset variable?) (value: 'far=')"),
    ("evaluate on an unknown device",
     lambda case: ["evaluate", str(case.run), "--data", str(case.fmnist), "--device", "gpu"],
     "oltr evaluate: error: unknown device (auto, cpu, mps, cuda or cuda:N) (value: 'gpu')"),
    ("curate with min above max",
     lambda case: ["curate", "fashion-mnist", "--out", str(case.tmp / "out"), "--max-count",
                   "3", "--min-count", "5"],
     "oltr curate: error: invalid long-tail profile: max_count (3) must be >= min_count (5)"),
    ("an unparsable override", lambda case: tiny_train_argv(case, "train.lr=["),
     "oltr train: error: cannot parse the value of override: invalid YAML: "),
    ("a seed beyond 2**32", lambda case: tiny_train_argv(case, "--seed", "200000000000000"),
     "oltr train: error: config key 'seed' must be an integer in 0..4294967295"),
    ("train --out a file", lambda case: tiny_train_argv(case, out=a_file(case)),
     "notes.txt: run directory exists and is not a directory"),
    ("evaluate --output a directory",
     lambda case: ["evaluate", str(case.run), "--data", str(case.fmnist), "--output",
                   str(case.tmp)],
     ": report path is a directory; give a file name, e.g. "),
    ("evaluate --output an unwritable path",
     lambda case: ["evaluate", str(case.run), "--data", str(case.fmnist), "--output",
                   "/proc/1/oltr-report.json"],
     "oltr evaluate: error: /proc/1: cannot write the report: directory is not writable"),
    ("evaluate --output under a file",
     lambda case: ["evaluate", str(case.run), "--data", str(case.fmnist), "--output",
                   str(a_file(case, "report.json"))],
     "notes.txt: cannot write the report: a parent of its path is not a directory"),
    ("evaluate --output a user's file",
     lambda case: ["evaluate", str(case.run), "--data", str(case.fmnist), "--output",
                   str(a_file(case))],
     "notes.txt: report path holds a file that is not an oltr report; it is not overwritten"),
    ("predict with a text threshold in the decision rule",
     predict_with_rule(lambda r: r.update(threshold="high")),
     "decision.json: 'threshold' must be a finite number or null (value: 'high')"),
    ("predict with no threshold in the decision rule",
     predict_with_rule(lambda r: r.pop("threshold")),
     "decision.json: lacks key 'threshold' (null for a closed-set rule)"),
    ("predict with a decision rule of other weights",
     predict_with_rule(lambda r: r["record"]["weights"].update(sha256="0" * 64, epoch=13)),
     "decision.json: the decision rule was fitted for other weights"),
    ("curate proportional with a fixed count",
     lambda case: ["curate", f"folder:{case.tmp}", "--profile", "proportional", "--max-count",
                   "5", "--out", str(case.tmp / "out")],
     "oltr curate: error: --max-count does not apply to the proportional profile"),
    ("curate given lists with --known",
     lambda case: ["curate", f"given:{case.tmp}", "--known", "3", "--out", str(case.tmp / "out")],
     "oltr curate: error: 'known' does not apply to given splits"),
    ("curate with a missing class-order file",
     lambda case: ["curate", "fashion-mnist", "--class-order", str(case.tmp / "order.txt"),
                   "--out", str(case.tmp / "out")],
     "order.txt: --class-order must be 'size' or a file of class names"),
    ("identify with a folder for probes",
     lambda case: ["identify", str(case.run), "--probes", str(case.tmp), "--no-pseudo-shots"],
     ": the probes must be a split file ('path identity' per line), not a folder"),
    ("identify into a user's embeddings folder",
     lambda case: ["identify", str(case.run), "--probes", str(case.bench() / "train.txt"),
                   "--no-pseudo-shots", "--embeddings-dir", str(a_file(case).parent)],
     ": --embeddings-dir must be a new or empty folder (nothing there is overwritten)"),
    ("predict with an empty path (an unset variable)",
     lambda case: ["predict", str(case.run), ""],
     "oltr predict: error: PATH: an empty path (an unset variable?) (value: '')"),
    ("train --data an empty path",
     lambda case: ["train", "--method", "plain", "--data", "", "--out", str(case.tmp / "out")],
     "oltr train: error: --data: an empty path (an unset variable?) (value: '')"),
    ("train --config a device",
     lambda case: ["train", "--config", "/dev/zero", "--data", str(case.tmp),
                   "--out", str(case.tmp / "out")],
     "oltr train: error: /dev/zero: config file is not a regular file (a character device)"),
    ("predict --open-threshold nan",
     lambda case: ["predict", str(case.run), str(next((case.fmnist / "images").rglob("*.png"))),
                   "--open-threshold", "nan"],
     "oltr predict: error: the open-score threshold must be a finite number (value: nan)"),
    ("predict --threshold nan (a probability, as in evaluate)",
     lambda case: ["predict", str(case.run), str(next((case.fmnist / "images").rglob("*.png"))),
                   "--threshold", "nan"],
     "oltr predict: error: a probability threshold must lie in [0, 1] (value: nan)"),
]


@pytest.mark.parametrize(("argv", "message"), [pytest.param(a, m, id=i) for i, a, m in CLI_ROWS])
def test_cli_exits_2_with_one_line(argv, message, tmp_path, request, capsys) -> None:
    with within(120):
        code = main(argv(Case(tmp_path, request)))
    err = capsys.readouterr().err
    message = message.replace("{bench}", str(tmp_path / "bench"))
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing created before the error
    if (tmp_path / "notes.txt").exists():
        assert (tmp_path / "notes.txt").read_text() == "mine"


def test_predict_refuses_an_empty_path_as_a_library_call_too() -> None:
    from oltr.predict import expand_inputs
    with pytest.raises(InputError, match=r"^an empty path \(an unset variable\?\) \(value: ''\)$"):
        expand_inputs([""])


def test_a_key_written_twice_in_a_base_file_is_named(tmp_path) -> None:
    (tmp_path / "parent.yaml").write_text("train:\n  lr: 0.1\n\n  lr: 0.3\n")
    (tmp_path / "mine.yaml").write_text("base: parent.yaml\ntrain:\n  epochs: 2\n")
    with pytest.raises(InputError) as info:
        load_config(config_file=tmp_path / "mine.yaml")
    assert str(info.value) == (f"{tmp_path / 'parent.yaml'}:4: key 'lr' is written twice "
                               "(first on line 2)")


def test_every_packaged_yaml_writes_each_key_once() -> None:
    from oltr.config import CONFIG_DIR, read_yaml
    from oltr.io import DuplicateKey, UniqueKeyLoader, read_yaml_file

    files = sorted(CONFIG_DIR.rglob("*.yaml"))
    assert len(files) > 10
    for path in files:  # InputError on a duplicate
        read_yaml(path)
        read_yaml_file(path, "config file")
    import yaml
    with pytest.raises(DuplicateKey, match=r"key 'a' is written twice \(first on line 1\)"):
        yaml.load("a: 1\nb: 2\na: 3\n", Loader=UniqueKeyLoader)
    merged = yaml.load("x: &x {a: 1, b: 2}\ny:\n  <<: *x\n  a: 3\n", Loader=UniqueKeyLoader)
    assert merged["y"] == {"a": 3, "b": 2}  # a merge key's values may be overridden


def test_predict_reports_a_fifo_among_the_images_and_goes_on(trained_run, fmnist_small, tmp_path,
                                                             capsys) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(next((fmnist_small / "images").rglob("*.png")), folder / "a.png")
    os.mkfifo(folder / "b.png")
    with within(120):
        code = main(["predict", str(trained_run), str(folder), "--format", "jsonl"])
    captured = capsys.readouterr()
    assert code == 1
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [row["error"] is None for row in rows] == [True, False]
    assert rows[1]["error"] == f"{folder / 'b.png'}: cannot read image (not a regular file: a FIFO)"
    assert f"{folder / 'b.png'}: cannot read image (not a regular file: a FIFO)" in captured.err


def test_read_text_checks_what_a_path_is_before_reading(tmp_path) -> None:
    from oltr.io import read_json_object, read_text
    os.mkfifo(tmp_path / "fifo.json")
    with within(30), pytest.raises(InputError) as info:
        read_json_object(tmp_path / "fifo.json", "run description")
    assert str(info.value) == f"{tmp_path / 'fifo.json'}: run description is not a regular file (a FIFO)"
    with pytest.raises(InputError, match=r"^/dev/zero: split file is not a regular file \(a "
                                         r"character device\)$"):
        read_text("/dev/zero", "split file")
    (tmp_path / "big.txt").write_bytes(b"a 0\n" * 10)
    with pytest.raises(InputError, match=r"big\.txt: split file is too large \(40 bytes; at most "
                                         r"39\)$"):
        read_text(tmp_path / "big.txt", "split file", max_bytes=39)
    assert read_text(tmp_path / "big.txt", "split file", max_bytes=40) == "a 0\n" * 10


def test_paths_inside_the_root_work_and_outside_ones_only_when_allowed(tmp_path) -> None:
    case = Case(tmp_path, None)  # type: ignore[arg-type]
    root = case.bench(train="train/n01440764/x.JPEG 0\ni/t1.png 1\ni/t2.png 2\n")
    (root / "train" / "n01440764").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "train" / "n01440764" / "x.JPEG", "JPEG")
    bench = load_benchmark(root)  # the published ImageNet-LT layout: relative paths
    assert bench.dataset("train")[0][1] == 0

    outside = tmp_path / "elsewhere.png"
    Image.new("L", (8, 8), 7).save(outside)
    Image.new("L", (8, 8), 9).save(tmp_path / "elsewhere2.png")  # one file per line: the same
    (root / "test.txt").write_text(f"{outside} 1\n../elsewhere2.png 2\n")  # file twice is refused
    with pytest.raises(InputError, match="path leaves the image root"):
        load_benchmark(root)
    allowed = load_benchmark(root, allow_outside_root=True)
    dataset = allowed.dataset("test", mode="L")
    assert [dataset[i][1] for i in range(2)] == [1, 2]
    assert round(dataset[0][0][0, 0, 0].item() * 255) == 7

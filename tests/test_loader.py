"""One way errors leave DataLoader workers (oltr.data.loader): with num_workers > 0 a bad image
is the original one-line InputError in the main process; mixed image sizes name the image
(issue 9)."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from oltr.config import load_config, stage_config
from oltr.data import dataset_for, load_benchmark
from oltr.data.loader import ImageLoader, LoadFailure
from oltr.errors import InputError
from oltr.inference import eval_loader
from oltr.runtime import Runtime
from oltr.train.loaders import build_train_loader

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_benchmark(root: Path, *, sizes: dict[str, tuple[int, int]] | None = None,
                   corrupt: str | None = None) -> Path:
    """3 classes, 6 train / 3 val / 3 test 8x8 PNGs; ``corrupt`` names one image to break."""
    root.mkdir()
    texts = {"train": [(f"i/t{k}.png", k % 3) for k in range(6)],
             "val": [(f"i/v{k}.png", k) for k in range(3)],
             "test": [(f"i/s{k}.png", k) for k in range(3)]}
    (root / "i").mkdir()
    for name, entries in texts.items():
        (root / f"{name}.txt").write_text("".join(f"{p} {label}\n" for p, label in entries))
        for path, label in entries:
            size = (sizes or {}).get(path, (8, 8))
            Image.new("L", size, 40 * label).save(root / path)
    (root / "classes.txt").write_text("a\nb\nc\n")
    if corrupt is not None:
        (root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def config(*overrides: str) -> dict:
    return load_config("plain", overrides=["model.width=8", "train.batch_size=4",
                                           "eval.batch_size=4", *overrides])


def first_error(loader) -> InputError:
    with pytest.raises(InputError) as info:
        for _ in loader:
            pass
    return info.value


def test_a_worker_error_is_the_original_one_line_error(tmp_path):
    bench = load_benchmark(tiny_benchmark(tmp_path / "b", corrupt="i/v2.png"))
    data_cfg = config()["data"]
    dataset = dataset_for(bench, "val", data_cfg, train=False)
    with pytest.raises(InputError) as direct:
        dataset[2]
    expected = str(direct.value)
    assert expected.startswith(f"{tmp_path / 'b' / 'val.txt'}:3: cannot read image ")
    assert str(tmp_path / "b" / "i" / "v2.png") in expected
    for workers in (0, 2):
        error = first_error(eval_loader(dataset, 2, workers))
        assert str(error) == expected and "\n" not in str(error) and "Traceback" not in str(error)
        assert error.path == str(tmp_path / "b" / "val.txt") and error.line == 3


def test_train_loader_with_workers_delivers_the_one_line_error(tmp_path):
    bench = load_benchmark(tiny_benchmark(tmp_path / "b", corrupt="i/t4.png"))
    cfg = config("data.num_workers=2", "train.batch_size=2", "data.loader=files")  # 3 batches
    loader = build_train_loader(bench, stage_config(cfg, "main"), Runtime(torch.device("cpu")))
    loader.set_epoch(0)
    error = first_error(loader)
    assert str(error).startswith(f"{tmp_path / 'b' / 'train.txt'}:5: cannot read image "
                                 f"{tmp_path / 'b' / 'i' / 't4.png'} (")
    assert "\n" not in str(error)


def test_skipping_bad_images_with_workers(tmp_path):
    bench = load_benchmark(tiny_benchmark(tmp_path / "b", corrupt="i/t4.png"))
    dropped = bench.drop_unreadable_images(["train", "val"], num_workers=2)
    assert [message.split(": cannot read")[0] for message in dropped["train"]] == [
        f"{tmp_path / 'b' / 'train.txt'}:5"]
    assert dropped["val"] == [] and len(bench.split("train")) == 5


def test_mixed_sizes_name_the_first_image_that_differs(tmp_path):
    root = tiny_benchmark(tmp_path / "b", sizes={"i/s2.png": (10, 8)})
    bench = load_benchmark(root)
    data_cfg = config("data.transform=none")["data"]
    dataset = dataset_for(bench, "test", data_cfg, train=False)
    for workers in (0, 2):
        error = first_error(eval_loader(dataset, 3, workers))
        assert str(error) == (
            f"{root / 'test.txt'}:3: image {root / 'i' / 's2.png'} is 10x8 pixels, 1 channel, "
            f"but {root / 'i' / 's0.png'}, the first image of its batch, is 8x8 pixels, "
            "1 channel: images of different sizes need a resizing transform (data.transform: "
            "small or imagenet, not none)")
    batches = list(eval_loader(dataset, 2, 0))  # batches of one size are fine
    assert [tuple(images.shape) for images, _ in batches] == [(2, 1, 8, 8), (1, 1, 8, 10)]


def test_load_failure_round_trips_the_error():
    error = InputError("label out of range", path="x/val.txt", line=2, value="3")
    failure = pickle.loads(pickle.dumps(LoadFailure.of(error)))
    again = failure.error()
    assert str(again) == str(error) == "x/val.txt:2: label out of range (value: '3')"
    assert (again.path, again.line, again.value) == ("x/val.txt", 2, "3")


def test_a_custom_collate_and_plain_datasets_pass_through():
    data = [(torch.full((1, 2, 2), float(i)), i) for i in range(5)]
    images, labels = next(iter(ImageLoader(data, batch_size=5)))
    assert images.shape == (5, 1, 2, 2) and labels.tolist() == [0, 1, 2, 3, 4]
    assert next(iter(ImageLoader(list(range(3)), batch_size=3, collate_fn=list))) == [0, 1, 2]
    assert len(ImageLoader(data, batch_size=2)) == 3

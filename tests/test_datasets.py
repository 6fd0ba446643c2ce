"""Benchmark loading and validation, the image-list dataset, and transform presets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from oltr.data.curation import curate
from oltr.data.datasets import ImageListDataset, load_benchmark
from oltr.data.transforms import build_transform
from oltr.errors import InputError


def write_png(path, value=0, size=8, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value).save(path)


# --- ImageListDataset ----------------------------------------------------------------------


def test_items_are_pixel_exact_tensors_with_labels(tmp_path):
    write_png(tmp_path / "a.png", 51)
    write_png(tmp_path / "b.png", (255, 0, 102), mode="RGB")
    dataset = ImageListDataset([("a.png", 3), ("b.png", 0)], tmp_path, mode="L")
    assert len(dataset) == 2 and dataset.labels.tolist() == [3, 0]
    assert dataset.labels.dtype == np.int64
    image, label = dataset[0]
    assert label == 3 and image.shape == (1, 8, 8)
    assert torch.allclose(image, torch.full((1, 8, 8), 0.2))
    rgb = ImageListDataset([("b.png", 0)], tmp_path, mode="RGB")[0][0]
    assert rgb.shape == (3, 8, 8)
    assert torch.allclose(rgb[:, 0, 0], torch.tensor([1.0, 0.0, 0.4]))
    gray = ImageListDataset([("b.png", 0)], tmp_path, mode="L")[0][0]
    assert gray[0, 0, 0].item() == pytest.approx(round(0.299 * 255 + 0.114 * 102) / 255)
    with pytest.raises(ValueError, match="mode must be one of RGB, L"):
        ImageListDataset([], tmp_path, mode="CMYK")


def test_cache_keeps_decoded_images(tmp_path):
    write_png(tmp_path / "a.png", 10)
    cached = ImageListDataset([("a.png", 0)], tmp_path, cache=True, mode="L")
    plain = ImageListDataset([("a.png", 0)], tmp_path, cache=False, mode="L")
    first = cached[0][0]
    plain[0]
    (tmp_path / "a.png").unlink()
    assert torch.equal(cached[0][0], first)
    with pytest.raises(InputError, match="image not found"):
        plain[0]


def test_bad_images_name_the_image_and_split_line(tmp_path):
    write_png(tmp_path / "good.png")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG but then nothing sensible")
    write_png(tmp_path / "whole.png", 7, size=64)
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    split = tmp_path / "split.txt"
    split.write_text("good.png 0\n\ngarbage.png 1\nmissing.png 0\ncut.png 1\n")
    entries = [("good.png", 0), ("garbage.png", 1), ("missing.png", 0), ("cut.png", 1)]
    dataset = ImageListDataset(entries, tmp_path, source_file=split)
    dataset[0]
    for index, line, image in ((1, 3, "garbage.png"), (2, 4, "missing.png"), (3, 5, "cut.png")):
        with pytest.raises(InputError) as info:
            dataset[index]
        message = str(info.value)
        assert message.startswith(f"{split}:{line}: ")
        assert str(tmp_path / image) in message


# --- load_benchmark ------------------------------------------------------------------------


def plain_benchmark(tmp_path, *, classes="a\nb\nc\n", **files):
    """ImageNet-LT-style directory; ``files`` override the default split contents."""
    contents = {
        "LT_train": "i/t0.png 0\ni/t1.png 1\ni/t2.png 2\ni/t3.png 0\n",
        "LT_val": "i/v0.png 0\ni/v1.png 2\n",
        "LT_test": "i/s0.png 1\n",
        "LT_open": "i/o0.png -1\ni/o1.png -1\n",
    }
    contents.update(files)
    root = tmp_path / "bench"
    root.mkdir()
    for name, text in contents.items():
        if text is not None:
            (root / f"{name}.txt").write_text(text)
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    return root


def test_plain_directory_of_published_style_split_files(tmp_path):
    root = plain_benchmark(tmp_path)
    images = tmp_path / "imagenet"
    images.mkdir()
    bench = load_benchmark(root, image_root=images)
    assert bench.manifest is None and bench.image_root == images
    assert bench.class_names == ["a", "b", "c"] and bench.num_classes == 3
    assert bench.train_counts.tolist() == [2, 1, 1]
    assert bench.split("val") == [("i/v0.png", 0), ("i/v1.png", 2)]
    assert bench.split("open") == [("i/o0.png", -1), ("i/o1.png", -1)]
    assert bench.split_file("test") == root / "LT_test.txt"
    with pytest.raises(ValueError, match="split must be one of train, val, test, open"):
        bench.split("holdout")


def test_plain_directory_without_class_names_or_open_split(tmp_path):
    root = plain_benchmark(tmp_path, classes=None, LT_open=None)
    bench = load_benchmark(root)
    assert bench.class_names == ["class_0", "class_1", "class_2"]
    assert bench.image_root == root and not bench.has_split("open")
    with pytest.raises(InputError, match="benchmark has no open split"):
        bench.split("open")


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"LT_val": "i/v0.png 0\ni/v1.png 3\n"}, r"LT_val.txt:2: label out of range"),
        ({"LT_test": "i/s0.png -1\n"}, r"LT_test.txt:1: open label -1 is not allowed"),
        ({"LT_open": "i/o0.png -1\ni/o1.png 2\n"}, r"LT_open.txt:2: open split holds only label -1"),
        ({"LT_train": "i/t0.png 0\ni/t2.png 2\n"}, r"LT_train.txt: class 1 \('b'\) has no train"),
        ({"LT_test": "i/v1.png 2\n"}, r"LT_test.txt:1: image also listed in .*LT_val.txt line 2"),
        ({"LT_val": "i/v0.png 0\ni/v1.png\n"}, r"LT_val.txt:2: expected 'path label'"),
        ({"LT_train": None}, r"no file matches '\*train\*.txt'"),
    ],
)
def test_invalid_benchmarks_are_named_by_file_and_line(tmp_path, files, match):
    root = plain_benchmark(tmp_path, **files)
    with pytest.raises(InputError, match=match):
        load_benchmark(root)


def test_curated_benchmark_round_trip(tmp_path):
    tree = tmp_path / "tree"
    for class_index, count in enumerate([9, 9, 9]):
        for i in range(count):
            write_png(tree / f"k{class_index}" / f"{i}.png", class_index * 100 + i)
    out = tmp_path / "out"
    manifest = curate(
        f"folder:{tree}", out, known=2, open=1, profile="exp", max_count=4, min_count=2,
        val_per_class=2, test_per_class=3,
    )
    bench = load_benchmark(out)
    assert bench.manifest == manifest and bench.image_root == tree.resolve()
    assert bench.class_names == manifest["known_classes"]
    assert bench.train_counts.tolist() == [4, 2]
    dataset = bench.dataset("test", mode="L")
    for index, (path, label) in enumerate(bench.split("test")):
        image, got = dataset[index]
        assert got == label and path.startswith(bench.class_names[label] + "/")
        assert round(image[0, 0, 0].item() * 255) == int(path.split("/")[0][1:]) * 100 + int(
            path.split("/")[1].removesuffix(".png")
        )
    (out / "classes.txt").write_text("x\ny\n")
    with pytest.raises(InputError, match="classes.txt: sha256"):
        load_benchmark(out)
    with pytest.raises(InputError, match="does not match the manifest's known_classes"):
        load_benchmark(out, verify=False)


def test_curated_benchmark_without_its_manifest_reads_as_a_plain_directory(tmp_path):
    """open.txt and open_classes.txt both match *open*.txt; open_classes.txt is no split."""
    tree = tmp_path / "tree"
    for class_index in range(3):
        for i in range(9):
            write_png(tree / f"k{class_index}" / f"{i}.png", class_index * 100 + i)
    out = tmp_path / "out"
    curate(f"folder:{tree}", out, known=2, open=1, profile="exp", max_count=4, min_count=2,
           val_per_class=2, test_per_class=3)
    curated = load_benchmark(out)
    assert (out / "open_classes.txt").is_file()
    (out / "manifest.json").unlink()
    plain = load_benchmark(out, image_root=tree)
    assert plain.manifest is None and plain.split_file("open") == out / "open.txt"
    for name in ("train", "val", "test", "open"):
        assert plain.split(name) == curated.split(name), name
    assert plain.class_names == curated.class_names


def test_companion_files_never_count_as_splits(tmp_path):
    root = plain_benchmark(tmp_path)
    (root / "LT_open_classes.txt").write_text("i/o0.png 0\ni/o1.png 0\n")  # another *open*
    with pytest.raises(InputError, match=r"several files match '\*open\*\.txt': LT_open\.txt, "
                                         r"LT_open_classes\.txt"):
        load_benchmark(root)  # only the exact companion names are excluded, nothing is guessed


# --- transforms ----------------------------------------------------------------------------


def test_none_preset_is_to_tensor_and_normalize():
    image = Image.new("L", (5, 3), 153)
    transform = build_transform("none", train=True, image_size=5, channels=1, mean=[0.5], std=[0.2])
    out = transform(image)
    assert out.shape == (1, 3, 5)
    assert torch.allclose(out, torch.full((1, 3, 5), (0.6 - 0.5) / 0.2))


def test_small_preset_shapes_and_padding_crop():
    image = Image.new("L", (28, 28), 255)
    kwargs = {"image_size": 28, "channels": 1, "mean": [0.0], "std": [1.0]}
    evaluation = build_transform("small", train=False, **kwargs)
    assert torch.equal(evaluation(image), torch.ones(1, 28, 28))
    train = build_transform("small", train=True, **kwargs)
    torch.manual_seed(0)
    crops = [train(image) for _ in range(20)]
    assert all(crop.shape == (1, 28, 28) for crop in crops)
    # padding 28 // 8 = 3 zero pixels: some crops show a border, none more than 3 rows/cols
    assert any(crop.min() == 0 for crop in crops)
    assert all(crop[0, 3:-3, 3:-3].min() == 1 for crop in crops)
    resized = evaluation(Image.new("L", (56, 40), 0))
    assert resized.shape == (1, 28, 28)


def test_imagenet_preset_sizes():
    image = Image.new("RGB", (300, 200), (10, 20, 30))
    kwargs = {"channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3}
    assert build_transform("imagenet", train=False, image_size=224, **kwargs)(image).shape == (
        3, 224, 224
    )
    evaluation = build_transform("imagenet", train=False, image_size=112, **kwargs)
    assert [type(step).__name__ for step in evaluation.transforms] == [
        "Resize", "CenterCrop", "ToTensor", "Normalize"
    ]
    assert evaluation.transforms[0].size == 128  # 112 * 256 / 224
    torch.manual_seed(0)
    train = build_transform("imagenet", train=True, image_size=64, **kwargs)
    assert train(image).shape == (3, 64, 64)
    names = [type(step).__name__ for step in train.transforms]
    assert names[:3] == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preset": "fancy"}, "preset must be one of small, imagenet, none"),
        ({"mean": [0.5, 0.5]}, "mean and std need 1 values each"),
        ({"std": [0.0]}, "std values must be > 0"),
        ({"channels": 2}, "channels must be 1 or 3"),
        ({"image_size": 0}, "image_size must be a positive integer"),
    ],
)
def test_build_transform_rejects_bad_arguments(kwargs, match):
    args = {"preset": "small", "train": False, "image_size": 28, "channels": 1, "mean": [0.5],
            "std": [0.5]} | kwargs
    with pytest.raises(ValueError, match=match):
        build_transform(**args)


def test_a_folder_of_class_folders_is_pointed_to_curate(tmp_path):
    """`oltr train --data` on raw class folders: the error says to curate them first."""
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    with pytest.raises(InputError, match=r"curate it first: oltr curate folder:"):
        load_benchmark(tmp_path)


def test_require_images_finds_missing_files_of_every_split_before_anything_reads_them(tmp_path):
    """Training's check (require_images): a listed file that does not exist is named by split
    file and line with how many of its split are missing; a split none of whose images is
    found points at the image root. Without it, loading only checks paths (the image is
    reported when read)."""
    for name in ("a0", "a1", "b0", "b1", "v0", "v1", "t0", "t1"):
        write_png(tmp_path / "img" / f"{name}.png")
    (tmp_path / "train.txt").write_text("img/a0.png 0\nimg/a1.png 0\nimg/b0.png 1\nimg/b1.png 1\n")
    (tmp_path / "val.txt").write_text("img/v0.png 0\nimg/v1.png 1\n")
    (tmp_path / "test.txt").write_text("img/t0.png 0\nimg/t1.png 1\nimg/gone.png 1\n"
                                       "img/gone2.png 0\n")
    load_benchmark(tmp_path)  # paths only
    with pytest.raises(InputError, match=r"test\.txt:3: image not found: .*img/gone\.png \(1 more "
                                         r"of the 4 images of this split are missing\)"):
        load_benchmark(tmp_path, require_images=True)
    (tmp_path / "test.txt").write_text("img/t0.png 0\nimg/t1.png 1\n")
    load_benchmark(tmp_path, require_images=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(InputError, match=r"train\.txt:1: image not found: .*elsewhere/img/a0\.png "
                                         r"\(none of the 4 images of this split is found under "
                                         r"the image root .*elsewhere: is data\.image_root"):
        load_benchmark(tmp_path, image_root=elsewhere, require_images=True)


def test_training_checks_every_split_before_it_creates_the_run(fmnist_small, tmp_path):
    """A test image missing stops `oltr train` before the run folder exists (not at
    evaluation, hours later); data.skip_bad_images=true leaves it to the loaders."""
    import json
    import shutil

    from oltr.config import load_config
    from oltr.pipeline import check_run

    bench = tmp_path / "bench"
    shutil.copytree(fmnist_small, bench)
    first = (bench / "test.txt").read_text().split("\n", 1)[0].rsplit(" ", 1)[0]
    (bench / json.loads((bench / "manifest.json").read_text())["image_root"] / first).unlink()
    with pytest.raises(InputError, match=r"test\.txt:1: image not found"):
        check_run(load_config("plain"), bench, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    check_run(load_config("plain", overrides=["data.skip_bad_images=true"]), bench,
              tmp_path / "run")


def test_a_split_file_given_as_the_benchmark_names_its_folder(tmp_path):
    (tmp_path / "ImageNet_LT_train.txt").write_text("a.png 0\n")
    with pytest.raises(InputError, match=r"ImageNet_LT_train\.txt: a benchmark is the folder "
                                         r"holding the split files, not one of them: give "):
        load_benchmark(tmp_path / "ImageNet_LT_train.txt")

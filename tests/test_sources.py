"""Sources: folder per class, split files, Fashion-MNIST IDX (synthetic and the real files)."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from oltr.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_SYSTEM_DIR,
    find_fashion_mnist,
    parse_source,
    read_idx,
)
from oltr.errors import InputError


def write_png(path, value=0, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_fashion_mnist(directory, *, gz=True, train=12, test=5):
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for stem, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{stem}-{kind}-ubyte"
            if gz:
                (directory / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array), mtime=0))
            else:
                (directory / name).write_bytes(idx_bytes(array))
        arrays[stem] = (images, labels)
    return arrays


# --- folder:PATH ---------------------------------------------------------------------------


def test_folder_source_classes_keys_and_images(tmp_path):
    root = tmp_path / "photos"
    write_png(root / "cat" / "a.png", 10)
    write_png(root / "cat" / "deep" / "b.PNG", 20)
    write_png(root / "ant" / "c.png", 30)
    (root / "ant" / "notes.txt").write_text("not an image")
    write_png(root / "ant" / ".hidden" / "d.png")
    write_png(root / ".cache" / "e.png")
    source = parse_source(f"folder:{root}")
    assert source.class_names == ["ant", "cat"]
    assert source.train == [("ant/c.png", 0), ("cat/a.png", 1), ("cat/deep/b.PNG", 1)]
    assert source.test is None and not source.needs_export
    assert source.image_root == root.resolve()
    assert np.asarray(source.load_image("cat/deep/b.PNG")).max() == 20
    source.export_image("ant/c.png", tmp_path / "out" / "c.png")
    assert (tmp_path / "out" / "c.png").read_bytes() == (root / "ant" / "c.png").read_bytes()


def test_folder_source_errors(tmp_path):
    with pytest.raises(InputError, match="nowhere: image folder not found"):
        parse_source(f"folder:{tmp_path / 'nowhere'}")
    flat = tmp_path / "flat"
    write_png(flat / "a.png")
    with pytest.raises(InputError, match="flat: no class folders"):
        parse_source(f"folder:{flat}")
    root = tmp_path / "tree"
    write_png(root / "full" / "a.png")
    (root / "empty").mkdir()
    (root / "empty" / "readme.md").write_text("x")
    with pytest.raises(InputError, match="class folder 'empty' holds no images"):
        parse_source(f"folder:{root}")
    with pytest.raises(InputError, match="unknown source; expected one of fashion-mnist"):
        parse_source("imagenet:/data")
    with pytest.raises(InputError, match="'folder:' needs a path"):
        parse_source("folder:")
    with pytest.raises(InputError, match="image_root applies to 'splits:PATH'"):
        parse_source(f"folder:{root}", image_root=tmp_path)


def test_load_image_of_a_corrupt_file_names_it(tmp_path):
    root = tmp_path / "tree"
    write_png(root / "a" / "good.png")
    (root / "a" / "broken.png").write_bytes(b"this is not a png")
    source = parse_source(f"folder:{root}")
    with pytest.raises(InputError, match=r"broken\.png: cannot read image"):
        source.load_image("a/broken.png")


# --- splits:PATH ---------------------------------------------------------------------------


def test_splits_directory_with_class_names_and_test_split(tmp_path):
    (tmp_path / "LT_train.txt").write_text("x/1.jpg 0\nx/2.jpg 1\ny/3.jpg 1\n")
    (tmp_path / "LT_test.txt").write_text("t/1.jpg 1\n")
    (tmp_path / "LT_val.txt").write_text("v/1.jpg 0\n")
    (tmp_path / "classes.txt").write_text("zebra\nyak\n")
    source = parse_source(f"splits:{tmp_path}")
    assert source.class_names == ["zebra", "yak"]
    assert source.train == [("x/1.jpg", 0), ("x/2.jpg", 1), ("y/3.jpg", 1)]
    assert source.test == [("t/1.jpg", 1)]
    assert source.image_root == tmp_path.resolve()


def test_splits_file_with_image_root_and_default_names(tmp_path):
    split = tmp_path / "lists" / "train.txt"
    split.parent.mkdir()
    split.write_text("a.png 2\nb.png 0\nc.png 1\n")
    images = tmp_path / "images"
    images.mkdir()
    source = parse_source(f"splits:{split}", image_root=images)
    assert source.class_names == ["class_0", "class_1", "class_2"]
    assert source.image_root == images.resolve() and source.test is None


def test_splits_errors(tmp_path):
    (tmp_path / "train.txt").write_text("a.png 0\nb.png 2\n")
    with pytest.raises(InputError, match=r"train.txt: labels must cover 0..2; label 1 has no image"):
        parse_source(f"splits:{tmp_path / 'train.txt'}")
    (tmp_path / "train.txt").write_text("a.png 0\nb.png -1\n")
    with pytest.raises(InputError, match=r"train.txt:2: open label -1 is not allowed"):
        parse_source(f"splits:{tmp_path}")
    (tmp_path / "train.txt").write_text("a.png 0\nb.png 1\n")
    (tmp_path / "classes.txt").write_text("one\n")
    with pytest.raises(InputError, match=r"train.txt:2: label out of range: there are 1 classes"):
        parse_source(f"splits:{tmp_path}")
    (tmp_path / "other_train.txt").write_text("a.png 0\n")
    with pytest.raises(InputError, match=r"several files match '\*train\*.txt'"):
        parse_source(f"splits:{tmp_path}")
    (tmp_path / "classes.txt").unlink()
    (tmp_path / "other_train.txt").unlink()
    with pytest.raises(InputError, match="image root not found"):
        parse_source(f"splits:{tmp_path / 'train.txt'}", image_root=tmp_path / "none")


# --- Fashion-MNIST -------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_explicit_root(tmp_path, gz):
    raw = tmp_path / "FashionMNIST" / "raw"  # torchvision's layout under ROOT
    arrays = write_fake_fashion_mnist(raw, gz=gz)
    assert find_fashion_mnist(tmp_path, download=False) == raw
    source = parse_source(f"fashion-mnist:{tmp_path}")
    assert source.class_names == list(FASHION_MNIST_CLASSES) and source.needs_export
    assert source.train[:3] == [("train/00000", 0), ("train/00001", 1), ("train/00002", 2)]
    assert source.test[-1] == ("test/00004", 4)
    images, _ = arrays["t10k"]
    np.testing.assert_array_equal(np.asarray(source.load_image("test/00003")), images[3])
    source.export_image("train/00007", tmp_path / "x" / "7.png")
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "x" / "7.png")), arrays["train"][0][7]
    )
    with pytest.raises(InputError, match="no image 'train/00099'"):
        source.load_image("train/00099")


def test_fashion_mnist_not_found_says_where_and_how(tmp_path):
    with pytest.raises(InputError) as info:
        find_fashion_mnist(tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path) in message and "FashionMNIST/raw" in message
    assert "apt-get install dataset-fashion-mnist" in message and "fashion-mnist:ROOT" in message


def test_idx_validation_names_the_file(tmp_path):
    labels = np.arange(6, dtype=np.uint8)
    good = tmp_path / "labels-idx1-ubyte"
    good.write_bytes(idx_bytes(labels))
    np.testing.assert_array_equal(read_idx(good, expected_magic=2049), labels)
    with pytest.raises(InputError, match="labels-idx1-ubyte: not an IDX file .* magic number 2049"):
        read_idx(good, expected_magic=2051)
    truncated = tmp_path / "short-idx1-ubyte"
    truncated.write_bytes(idx_bytes(labels)[:-2])
    with pytest.raises(InputError, match=r"short-idx1-ubyte: IDX file truncated: 12 bytes"):
        read_idx(truncated, expected_magic=2049)
    cut_gz = tmp_path / "cut.gz"
    cut_gz.write_bytes(gzip.compress(idx_bytes(labels))[:-6])
    with pytest.raises(InputError, match=r"cut.gz: cannot read IDX file, truncated"):
        read_idx(cut_gz, expected_magic=2049)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(InputError, match="tiny: IDX file truncated"):
        read_idx(tiny, expected_magic=2051)


def test_fashion_mnist_label_count_mismatch(tmp_path):
    write_fake_fashion_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(InputError, match="5 images but 4 labels"):
        parse_source(f"fashion-mnist:{tmp_path}")


@pytest.mark.skipif(
    not FASHION_MNIST_SYSTEM_DIR.is_dir(),
    reason=f"real Fashion-MNIST not installed at {FASHION_MNIST_SYSTEM_DIR} "
    "(apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist():
    assert find_fashion_mnist(download=False) == FASHION_MNIST_SYSTEM_DIR
    source = parse_source("fashion-mnist")
    assert len(source.train) == 60000 and len(source.test) == 10000
    train_labels = np.array([label for _, label in source.train])
    test_labels = np.array([label for _, label in source.test])
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10
    assert source.train[0] == ("train/00000", 9)  # the first training image is an ankle boot
    assert source.test[0] == ("test/00000", 9)
    image = source.load_image("train/00000")
    assert image.size == (28, 28) and image.mode == "L"

"""Curation: profile counts, disjoint and balanced splits, determinism, checksums, no partial output."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import oltr.data.curation as curate_module
from oltr.data.curation import curate, load_manifest, load_open_classes, verify_manifest
from oltr.data.datasets import load_benchmark
from oltr.data.profiles import class_counts
from oltr.data.sources import FASHION_MNIST_SYSTEM_DIR, parse_source
from oltr.data.splits import read_split_file, sha256_file
from oltr.errors import InputError

KNOWN, OPEN, MAX, MIN, VAL, TEST = 12, 2, 60, 5, 5, 5


def write_png(path, value=0, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)


def make_tree(root, images_per_class):
    for class_index, count in enumerate(images_per_class):
        for i in range(count):
            write_png(root / f"c{class_index:02d}" / f"{i:03d}.png", (class_index * 17 + i) % 256)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """14 classes of 70 tiny PNGs: enough for the head (60 train + 5 val + 5 test)."""
    return make_tree(tmp_path_factory.mktemp("tree"), [MAX + VAL + TEST] * (KNOWN + OPEN))


@pytest.fixture(scope="module")
def curated(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("curated") / "lt"
    manifest = curate(
        f"folder:{tree}", out, seed=3, known=KNOWN, open=OPEN, profile="pareto", alpha=6.0,
        max_count=MAX, min_count=MIN, val_per_class=VAL, test_per_class=TEST,
    )
    return out, manifest


def splits_of(out):
    names = ["train", "val", "test", "open"]
    return {name: read_split_file(out / f"{name}.txt") for name in names}


def test_scaled_imagenet_lt_counts_follow_the_pareto_profile(curated):
    out, manifest = curated
    expected = class_counts("pareto", KNOWN, max_count=MAX, min_count=MIN, alpha=6.0)
    assert expected.tolist() == [60, 46, 36, 28, 22, 17, 14, 11, 9, 7, 6, 5]
    splits = splits_of(out)
    train_labels = np.array([label for _, label in splits["train"]])
    assert np.bincount(train_labels, minlength=KNOWN).tolist() == expected.tolist()
    assert manifest["counts"]["train"] == expected.tolist()
    assert load_benchmark(out).train_counts.tolist() == expected.tolist()


def test_splits_are_disjoint_balanced_and_consistent_with_classes(curated, tree):
    out, manifest = curated
    splits = splits_of(out)
    all_paths = [path for entries in splits.values() for path, _ in entries]
    assert len(all_paths) == len(set(all_paths))  # no image used twice
    for name, per_class in (("val", VAL), ("test", TEST)):
        labels = np.array([label for _, label in splits[name]])
        assert np.bincount(labels, minlength=KNOWN).tolist() == [per_class] * KNOWN
    known = (out / "classes.txt").read_text().splitlines()
    assert known == manifest["known_classes"] and len(known) == KNOWN
    assert len(manifest["open_classes"]) == OPEN
    assert not set(known) & set(manifest["open_classes"])
    for name in ("train", "val", "test"):
        for path, label in splits[name]:
            assert path.split("/")[0] == known[label]
            assert (tree / path).is_file()
    open_folders = {path.split("/")[0] for path, _ in splits["open"]}
    assert open_folders == set(manifest["open_classes"])
    assert {label for _, label in splits["open"]} == {-1}
    assert len(splits["open"]) == OPEN * TEST == manifest["counts"]["open"]
    assert manifest["image_root"] == str(tree.resolve())
    assert manifest["profile"] == {
        "name": "pareto", "alpha": 6.0, "max_count": MAX, "min_count": MIN, "ratio": None
    }


def test_manifest_file_checksums_and_tamper_detection(curated, tmp_path):
    out, manifest = curated
    text = (out / "manifest.json").read_text()
    assert text == json.dumps(manifest, sort_keys=True, indent=2) + "\n"
    assert load_manifest(out) == manifest
    assert set(manifest["files"]) == {"train.txt", "val.txt", "test.txt", "open.txt",
                                      "open_classes.txt", "classes.txt"}
    for name, digest in manifest["files"].items():
        assert sha256_file(out / name) == digest
    verify_manifest(out)
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    with open(copy / "val.txt", "a") as handle:
        handle.write("c00/999.png 0\n")
    with pytest.raises(InputError, match=r"val.txt: sha256 .* differs from manifest.json"):
        verify_manifest(copy)
    with pytest.raises(InputError, match=r"val.txt: sha256"):
        load_benchmark(copy)


def test_open_classes_file_names_the_class_of_each_open_image(curated, tmp_path):
    out, manifest = curated
    names, index = load_open_classes(out)
    assert names == manifest["open_classes"]
    opened = read_split_file(out / "open.txt")
    lines = read_split_file(out / "open_classes.txt")
    assert [path for path, _ in lines] == [path for path, _ in opened]
    assert len(index) == len(opened) == manifest["counts"]["open"]
    # a folder source's path starts with its class folder: the recorded class must be that one
    assert [path.split("/")[0] for path, _ in opened] == [names[i] for i in index]
    assert np.bincount(index, minlength=OPEN).tolist() == [TEST] * OPEN

    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "open_classes.txt").unlink()
    with pytest.raises(InputError, match=r"open_classes.txt is missing.*re-curate"):
        load_open_classes(copy)


def test_open_classes_file_leaves_the_split_files_unchanged(tree, curated, tmp_path):
    """open_classes.txt is extra: without open classes it is not written, and the split files
    hash as the manifest says (the same bytes as before the file existed)."""
    out, manifest = curated
    for name in ("train.txt", "val.txt", "test.txt", "open.txt", "classes.txt"):
        assert sha256_file(out / name) == manifest["files"][name]
    closed = tmp_path / "closed"
    result = curate(f"folder:{tree}", closed, seed=3, known=KNOWN, open=0, max_count=MAX,
                    min_count=MIN, val_per_class=VAL, test_per_class=TEST)
    assert "open_classes.txt" not in result["files"]
    assert not (closed / "open_classes.txt").exists()


def test_same_arguments_give_byte_identical_output(tree, curated, tmp_path):
    out, _ = curated
    again = tmp_path / "again"
    curate(
        f"folder:{tree}", again, seed=3, known=KNOWN, open=OPEN, max_count=MAX, min_count=MIN,
        val_per_class=VAL, test_per_class=TEST,
    )
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in out.iterdir())
    for path in out.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    other = tmp_path / "other-seed"
    curate(
        f"folder:{tree}", other, seed=4, known=KNOWN, open=OPEN, max_count=MAX, min_count=MIN,
        val_per_class=VAL, test_per_class=TEST,
    )
    assert (other / "train.txt").read_bytes() != (out / "train.txt").read_bytes()


def test_explicit_class_lists_and_selection_errors(tree, tmp_path):
    source = parse_source(f"folder:{tree}")
    manifest = curate(
        source, tmp_path / "a", known=["c03", "c01", "c07"], open=["c00"], profile="exp",
        max_count=20, ratio=10, val_per_class=2, test_per_class=3,
    )
    assert sorted(manifest["known_classes"]) == ["c01", "c03", "c07"]
    assert manifest["open_classes"] == ["c00"]
    assert manifest["counts"]["train"] == [20, 6, 2]  # 20 * 10^(-r/2)
    manifest = curate(
        source, tmp_path / "b", known=["c01"], open=3, max_count=4, min_count=4,
        val_per_class=1, test_per_class=1,
    )
    assert len(manifest["open_classes"]) == 3 and "c01" not in manifest["open_classes"]
    cases = [
        ({"known": ["c01"], "open": ["c01"]}, "both known and open"),
        ({"known": ["nope"]}, "not a class of the source .* 'nope'"),
        ({"known": ["c01", "c01"]}, "listed twice"),
        ({"known": 10, "open": 5}, "15 randomly drawn .* only 14"),
        ({"known": "c01"}, "give a count or a list"),
        ({"known": 0}, "known must be an integer >= 1"),
        ({"known": None, "open": list(source.class_names)}, "no known classes"),
        ({"val_per_class": 0}, "val_per_class must be an integer >= 1"),
    ]
    for kwargs, match in cases:
        out = tmp_path / "bad"
        with pytest.raises(InputError, match=match):
            curate(source, out, max_count=4, min_count=1, **kwargs)
        assert not out.exists()


def test_shortfall_names_the_class_and_leaves_nothing(tmp_path):
    tree = make_tree(tmp_path / "tree", [30, 12])
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        curate(
            f"folder:{tree}", out, known=2, max_count=20, min_count=20, val_per_class=2,
            test_per_class=5,
        )
    message = str(info.value)
    assert "has 12 images, needs 27 (train 20 + val 2 + test 5)" in message
    assert "'c01'" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


def test_a_shortfall_that_size_order_avoids_says_so(tmp_path):
    """A random class order that puts the small class at the head fails; the error says that
    --class-order size fits (and that order then curates); it does not say so when no order
    fits."""
    tree = make_tree(tmp_path / "tree", [40, 12])
    args = {"known": 2, "max_count": 30, "min_count": 5, "val_per_class": 2, "test_per_class": 5}
    messages = []
    for seed in range(8):
        try:
            curate(f"folder:{tree}", tmp_path / f"out{seed}", seed=seed, **args)
        except InputError as exc:
            messages.append(str(exc))
    assert messages and all("--class-order size (the classes with the most images at the "
                            "head) fits these counts" in m for m in messages)
    manifest = curate(f"folder:{tree}", tmp_path / "sized", class_order="size", **args)
    assert manifest["known_classes"] == ["c00", "c01"]
    with pytest.raises(InputError) as info:
        curate(f"folder:{tree}", tmp_path / "never", **{**args, "max_count": 50})
    assert "class-order" not in str(info.value)


def test_unreadable_image_fails_curation_with_its_name(tmp_path):
    tree = make_tree(tmp_path / "tree", [5, 5])
    (tree / "c01" / "002.png").write_bytes(b"garbage, not a PNG")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"c01/002\.png: cannot read image.*--skip-bad-images"):
        curate(f"folder:{tree}", out, max_count=3, min_count=3, val_per_class=1, test_per_class=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


def test_skip_bad_images_draws_from_the_good_images_and_lists_the_bad(tmp_path, capsys):
    """--skip-bad-images leaves every unreadable image of the source out before anything is
    drawn, lists each in the manifest with why, and the same bad files give the same
    benchmark (API and command byte-identical); the result verifies against its manifest."""
    from oltr.cli import main

    tree = make_tree(tmp_path / "tree", [6, 5])
    for name in ("c00/001.png", "c01/004.png"):
        (tree / name).write_bytes(b"garbage, not a PNG")
    args = {"max_count": 3, "min_count": 2, "val_per_class": 1, "test_per_class": 1}
    manifest = curate(f"folder:{tree}", tmp_path / "a", skip_bad_images=True, seed=3, **args)
    skipped = {entry["image"]: entry["reason"] for entry in manifest["skipped_images"]}
    assert sorted(skipped) == ["c00/001.png", "c01/004.png"]
    assert all("cannot read image" in reason for reason in skipped.values())
    listed = [key for split in ("train", "val", "test")
              for key, _ in read_split_file(tmp_path / "a" / f"{split}.txt")]
    assert not set(listed) & set(skipped) and len(listed) == 3 + 2 + 2 * 2
    verify_manifest(tmp_path / "a")
    code = main(["curate", f"folder:{tree}", "--out", str(tmp_path / "b"), "--seed", "3",
                 "--max-count", "3", "--min-count", "2", "--val-per-class", "1",
                 "--test-per-class", "1", "--skip-bad-images"])
    assert code == 0 and "2 unreadable images left out" in capsys.readouterr().out
    for name in ("train.txt", "val.txt", "test.txt", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_existing_output_needs_force_and_failures_remove_the_staging_dir(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "tree", [6, 6])
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = {"max_count": 3, "min_count": 1, "val_per_class": 1, "test_per_class": 2}
    with pytest.raises(InputError, match="out: output directory exists and is not empty"):
        curate(f"folder:{tree}", out, **args)
    # --force replaces only a benchmark oltr curated: never the user's folder (issue 9)
    with pytest.raises(InputError, match="out: output directory was not written by oltr curate"):
        curate(f"folder:{tree}", out, force=True, **args)
    assert (out / "old.txt").read_text() == "old"
    (out / "old.txt").unlink()
    curate(f"folder:{tree}", out, **{**args, "max_count": 2})  # into the empty folder
    assert load_manifest(out)["counts"]["train"] == [2, 1]
    curate(f"folder:{tree}", out, force=True, **args)  # replaces what oltr curated
    assert (out / "manifest.json").is_file() and (out / ".oltr").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tree"]

    def fail(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(curate_module, "atomic_write_bytes", fail)
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="disk full"):
        curate(f"folder:{tree}", fresh, **args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tree"]
    with pytest.raises(OSError, match="disk full"):
        curate(f"folder:{tree}", out, force=True, **args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tree"]
    assert load_manifest(out)["counts"]["train"] == [3, 1]  # the earlier output survives


def test_load_manifest_errors(tmp_path):
    with pytest.raises(InputError, match="manifest.json: manifest not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{\n  "format_version": 1,\n  oops\n}\n')
    with pytest.raises(InputError, match=r"manifest.json:3: manifest is not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 1}')
    with pytest.raises(InputError, match="manifest lacks keys: source, image_root"):
        load_manifest(tmp_path)


@pytest.mark.skipif(
    not FASHION_MNIST_SYSTEM_DIR.is_dir(),
    reason=f"real Fashion-MNIST not installed at {FASHION_MNIST_SYSTEM_DIR} "
    "(apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_lt_exports_pngs_deterministically(tmp_path):
    source = parse_source("fashion-mnist")
    args = {
        "seed": 1, "known": 4, "open": 2, "profile": "exp", "max_count": 200, "min_count": 10,
        "val_per_class": 20, "test_per_class": 50,
    }
    first, second = tmp_path / "first", tmp_path / "second"
    manifest = curate(source, first, **args)
    curate(source, second, **args)
    assert manifest["image_root"] == "images"
    assert manifest["counts"]["train"] == [200, 74, 27, 10]  # 200 * 20^(-r/3)
    assert manifest["counts"]["open"] == 100
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative
    splits = splits_of(first)
    exported = [path for entries in splits.values() for path, _ in entries]
    assert len(exported) == len(set(exported)) == 311 + 80 + 200 + 100
    assert len([f for f in files if f.parts[0] == "images"]) == len(exported)
    assert all(path.startswith("train/") for path, _ in splits["train"] + splits["val"])
    assert all(path.startswith("test/") for path, _ in splits["test"] + splits["open"])
    class_of = dict(source.train + source.test)
    known = manifest["known_classes"]
    for path, label in splits["train"][:50] + splits["test"][:50]:
        key = path.removesuffix(".png")
        assert source.class_names[class_of[key]] == known[label]
        pixels = np.asarray(Image.open(first / "images" / path))
        np.testing.assert_array_equal(pixels, np.asarray(source.load_image(key)))
    bench = load_benchmark(first)
    assert bench.image_root == first / "images"
    image, label = bench.dataset("test", mode="L")[0]
    assert image.shape == (1, 28, 28) and label == splits["test"][0][1]

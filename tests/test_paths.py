"""One path identity and one folder traversal (oltr.data.paths), and where they are used:
the folder: and splits: sources, load_benchmark's no-shared-image check (issue 9)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from PIL import Image

from oltr.data import curate, load_benchmark, parse_source
from oltr.data.paths import ImageLocator, check_image_paths, image_identity, walk_images
from oltr.errors import InputError


def png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), value).save(path)
    return path


def tree(root: Path, classes: int = 3, per_class: int = 12) -> Path:
    for label in range(classes):
        for i in range(per_class):
            png(root / f"c{label}" / f"img{i:03d}.png", (label * 50 + i) % 256)
    return root


# --- identity --------------------------------------------------------------------------------


def test_spellings_of_one_file_have_one_identity(tmp_path):
    png(tmp_path / "c0" / "img000.png")
    png(tmp_path / "c0" / "img001.png")
    (tmp_path / "link").symlink_to(tmp_path / "c0")
    os.link(tmp_path / "c0" / "img001.png", tmp_path / "hard.png")
    locator = ImageLocator(tmp_path)
    same = {locator.resolve(p).identity for p in
            ("c0/img000.png", "./c0/img000.png", "c0//img000.png", "link/img000.png",
             "c0/../c0/img000.png", str(tmp_path / "c0" / "img000.png"))}
    assert len(same) == 1
    assert same == {image_identity(tmp_path / "c0" / "img000.png")}
    assert locator.resolve("c0/img001.png").identity == locator.resolve("hard.png").identity
    assert locator.resolve("c0/img000.png").identity != locator.resolve("c0/img001.png").identity
    assert locator.resolve("link/img000.png").real_path == str(tmp_path.resolve() / "c0" /
                                                                "img000.png")
    missing = locator.resolve("./c0/nothing.png")
    assert not missing.exists
    assert missing.identity == locator.resolve("c0/nothing.png").identity


def test_containment_follows_links(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    png(root / "c0" / "a.png")
    png(outside / "b.png")
    (root / "out").symlink_to(outside)
    locator = ImageLocator(root)
    assert locator.contains(locator.resolve("c0/a.png"))
    assert not locator.contains(locator.resolve("out/b.png"))
    assert not locator.contains(locator.resolve("../outside/b.png"))


# --- traversal -------------------------------------------------------------------------------


def test_walk_lists_images_sorted_through_links_inside_the_root(tmp_path):
    png(tmp_path / "store" / "x.png")
    png(tmp_path / "a" / "b.PNG")
    png(tmp_path / "a" / ".hidden.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "more").symlink_to(tmp_path / "store")
    (tmp_path / ".cache").symlink_to(tmp_path)  # hidden: never walked, so no loop
    found = walk_images(tmp_path / "a", root=tmp_path)
    assert [p.relative_to(tmp_path / "a").as_posix() for p in found] == ["b.PNG", "more/x.png"]


def test_a_symlink_loop_is_named(tmp_path):
    tree(tmp_path, classes=2, per_class=2)
    (tmp_path / "c0" / "loop").symlink_to("..")
    with pytest.raises(InputError, match=r"c0/loop: symbolic link loop: the link leads back to"):
        walk_images(tmp_path)
    (tmp_path / "c0" / "loop").unlink()
    (tmp_path / "c0" / "self").symlink_to("self")
    with pytest.raises(InputError, match=r"c0/self: symbolic link loop"):
        walk_images(tmp_path)


def test_a_folder_or_file_reached_twice_is_named(tmp_path):
    tree(tmp_path, classes=2, per_class=2)
    (tmp_path / "c0" / "also").symlink_to("../c1")
    with pytest.raises(InputError, match=r"c0/also: folder reached twice \(also as .*c1"):
        walk_images(tmp_path)
    (tmp_path / "c0" / "also").unlink()
    (tmp_path / "c0" / "copy.png").symlink_to("../c1/img000.png")
    with pytest.raises(InputError, match=r"c1/img000\.png: the same image file as .*c0/copy\.png"):
        walk_images(tmp_path)
    (tmp_path / "c0" / "copy.png").unlink()
    os.link(tmp_path / "c1" / "img001.png", tmp_path / "c0" / "hard.png")
    with pytest.raises(InputError, match=r"c1/img001\.png: the same image file as .*c0/hard"):
        walk_images(tmp_path)


def test_links_out_of_the_root_and_broken_links(tmp_path):
    root = tree(tmp_path / "root", classes=1, per_class=2)
    png(tmp_path / "elsewhere" / "far.png")
    (root / "c0" / "far").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InputError, match=r"c0/far: symbolic link leads outside the image root "
                                         r".*allow_outside_root"):
        walk_images(root)
    assert [p.name for p in walk_images(root, allow_outside_root=True)] == [
        "far.png", "img000.png", "img001.png"]
    (root / "c0" / "far").unlink()
    (root / "c0" / "gone.png").symlink_to(tmp_path / "nothing.png")
    with pytest.raises(InputError, match=r"c0/gone\.png: broken symbolic link"):
        walk_images(root)


# --- sources and benchmarks ------------------------------------------------------------------


def test_folder_source_with_a_loop_fails_curation_and_leaves_nothing(tmp_path):
    source = tree(tmp_path / "tree")
    (source / "c0" / "loop").symlink_to("..")
    with pytest.raises(InputError, match=r"tree/c0/loop: symbolic link loop"):
        curate(f"folder:{source}", tmp_path / "out", max_count=5, min_count=1,
               val_per_class=1, test_per_class=1)
    assert not (tmp_path / "out").exists()


def test_folder_source_follows_a_link_to_a_folder_inside_it(tmp_path):
    source = tree(tmp_path / "tree", classes=2, per_class=2)
    png(source / ".store" / "z.png")  # hidden folders are not classes
    (source / "c1" / "extra").symlink_to("../.store")
    loaded = parse_source(f"folder:{source}")
    assert loaded.class_names == ["c0", "c1"]
    assert loaded.train == [("c0/img000.png", 0), ("c0/img001.png", 0), ("c1/extra/z.png", 1),
                            ("c1/img000.png", 1), ("c1/img001.png", 1)]


def test_splits_source_naming_one_image_twice_names_both_lines(tmp_path):
    tree(tmp_path, classes=2, per_class=2)
    (tmp_path / "train.txt").write_text("c0/img000.png 0\nc1/img000.png 1\n./c0/img000.png 0\n")
    with pytest.raises(InputError, match=r"train\.txt:3: image listed twice \(first on line 1 "
                                         r"as 'c0/img000\.png': the same file\) \(value: "
                                         r"'\./c0/img000\.png'\)"):
        parse_source(f"splits:{tmp_path}")
    (tmp_path / "train.txt").write_text("c0/img000.png 0\nc1/img000.png 1\n")
    (tmp_path / "test.txt").write_text("c0/img001.png 0\nc1//img000.png 1\n")
    with pytest.raises(InputError, match=r"test\.txt:2: image also listed in .*train\.txt line 2 "
                                         r"as 'c1/img000\.png'; splits must not share images"):
        parse_source(f"splits:{tmp_path}")


def test_splits_source_refuses_a_link_out_of_the_root_unless_allowed(tmp_path):
    root = tree(tmp_path / "root", classes=2, per_class=1)
    png(tmp_path / "elsewhere" / "x.png")
    (root / "out").symlink_to(tmp_path / "elsewhere")
    (root / "train.txt").write_text("c0/img000.png 0\nout/x.png 1\n")
    with pytest.raises(InputError, match=r"train\.txt:2: path leads outside the image root .* "
                                         r"through a symbolic link .*--allow-outside-root"):
        parse_source(f"splits:{root}")
    assert parse_source(f"splits:{root}", allow_outside_root=True).train[1] == ("out/x.png", 1)


def plain(root: Path, **texts: str) -> Path:
    tree(root, classes=2, per_class=4)
    defaults = {"train": "c0/img000.png 0\nc1/img000.png 1\n", "val": "c0/img001.png 0\n",
                "test": "c0/img002.png 0\nc1/img002.png 1\n"}
    for name, text in (defaults | texts).items():
        (root / f"{name}.txt").write_text(text)
    return root


@pytest.mark.parametrize("spelling", ["./c0/img000.png", "c0//img000.png", "c0/./img000.png",
                                      "lnk/img000.png"])
def test_a_train_image_respelled_in_test_is_a_shared_image(tmp_path, spelling):
    root = plain(tmp_path, test=f"c0/img002.png 0\n{spelling} 0\n")
    (tmp_path / "lnk").symlink_to("c0")
    with pytest.raises(InputError, match=r"test\.txt:2: image also listed in .*train\.txt line 1 "
                                         r"as 'c0/img000\.png'; splits must not share images"):
        load_benchmark(root)


def test_one_image_twice_in_a_split_under_two_spellings(tmp_path):
    root = plain(tmp_path, test="c0/img002.png 0\n./c0/img002.png 0\n")
    with pytest.raises(InputError, match=r"test\.txt:2: image listed twice \(first on line 1 as "
                                         r"'c0/img002\.png': the same file\)"):
        load_benchmark(root)


def test_a_link_inside_the_image_root_cannot_lead_a_split_out_of_it(tmp_path):
    root = plain(tmp_path / "bench")
    png(tmp_path / "secret" / "s.png", 200)
    (root / "c0" / "door").symlink_to(tmp_path / "secret")
    (root / "test.txt").write_text("c0/img002.png 0\nc0/door/s.png 1\n")
    with pytest.raises(InputError, match=r"test\.txt:2: path leads outside the image root .* "
                                         r"through a symbolic link \(to .*secret/s\.png\); set "
                                         r"data\.allow_outside_root: true"):
        load_benchmark(root)
    bench = load_benchmark(root, allow_outside_root=True)
    assert round(bench.dataset("test", mode="L")[1][0][0, 0, 0].item() * 255) == 200


def test_identity_check_costs_about_one_lstat_per_entry(tmp_path):
    """The check is one ``lstat`` per entry plus light bookkeeping (one ``realpath`` per folder):
    ImageNet-LT's 186k entries take under a second on an idle machine (measured: 60k entries
    in 1.45 s against 1.26 s for the bare ``lstat`` calls, on 2 cores at load 6)."""
    folders, size = 50, 3_000
    for index in range(folders):
        (tmp_path / f"n{index:04d}").mkdir()
    relatives = [f"n{number % folders:04d}/{number:06d}.JPEG" for number in range(size)]
    for relative in relatives:
        (tmp_path / relative).touch()
    entries = {"train": [(relative, 0) for relative in relatives[: size // 2]],
               "test": [(relative, 0) for relative in relatives[size // 2:]]}
    lines = {name: list(range(1, len(split) + 1)) for name, split in entries.items()}
    files = {name: tmp_path / f"{name}.txt" for name in entries}
    started = time.perf_counter()
    for relative in relatives:
        os.lstat(os.path.join(tmp_path, relative))
    bare = time.perf_counter() - started
    started = time.perf_counter()
    check_image_paths(entries, lines, files, tmp_path)
    assert time.perf_counter() - started < 3 * bare + 0.5

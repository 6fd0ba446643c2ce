"""Property tests (hypothesis): split files round-trip or fail cleanly; curation of any class-count
table gives valid splits (disjoint, profile counts, balanced val/test) or a clear InputError."""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from oltr.data import class_counts, curate, load_benchmark, read_split_lines, write_split_file
from oltr.data.sources import Source
from oltr.data.splits import leaves_root
from oltr.errors import InputError

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])

labels = st.integers(min_value=-1, max_value=10**9 - 1)
# Paths a split file must carry unchanged: letters, digits, separators, inner spaces, accents.
plain_paths = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_ ./é-]{0,20}[A-Za-z0-9_]", fullmatch=True)


@pytest.fixture
def scratch():
    """A fresh directory per generated example (hypothesis reuses function-scoped fixtures)."""
    with tempfile.TemporaryDirectory(prefix="oltr-properties-") as root:
        counter = iter(range(10**9))
        yield lambda: Path(tempfile.mkdtemp(dir=root, prefix=f"{next(counter)}-"))


@SETTINGS
@given(st.lists(st.tuples(plain_paths, labels), min_size=1, max_size=20,
                unique_by=lambda entry: entry[0]))
def test_plain_entries_round_trip(scratch, entries) -> None:
    path = scratch() / "split.txt"
    write_split_file(path, entries)
    read, lines = read_split_lines(path, allow_outside_root=True)
    assert read == entries and lines == list(range(1, len(entries) + 1))


@SETTINGS
@given(st.lists(st.tuples(st.text(st.characters(exclude_categories=()), max_size=12), labels),
                min_size=1, max_size=8,
                unique_by=lambda entry: entry[0]))
def test_any_entries_round_trip_or_are_refused_before_writing(scratch, entries) -> None:
    path = scratch() / "split.txt"
    try:
        write_split_file(path, entries)
    except InputError:
        assert not path.exists()
        return
    assert read_split_lines(path, allow_outside_root=True)[0] == entries
    escaping = [image for image, _ in entries if leaves_root(image)]
    if escaping:
        with pytest.raises(InputError, match="path leaves the image root"):
            read_split_lines(path)


line_text = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=30),
    st.builds(lambda p, n: f"{p} {n}", st.text(max_size=10), st.integers(-3, 12)),
    st.sampled_from(["a.png 0", "a.png -1", "/abs.png 1", "../up.png 2", "a b.png 3",
                     "a.png ٣", "a.png +4", "a.png 1.0", "\ufeffa.png 0", "a.png\x0b1"]),
)


@SETTINGS
@given(
    st.one_of(
        st.lists(line_text, max_size=8).map(
            lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
        st.binary(max_size=80),
    ),
    st.one_of(st.none(), st.integers(1, 10)),
    st.booleans(),
    st.booleans(),
)
def test_any_split_file_parses_or_raises_input_error(scratch, data, num_classes, allow_open,
                                                      allow_outside_root) -> None:
    path = scratch() / "split.txt"
    path.write_bytes(data)
    try:
        entries, lines = read_split_lines(path, num_classes=num_classes, allow_open=allow_open,
                                          allow_outside_root=allow_outside_root)
    except InputError as error:
        assert str(error).startswith(str(path))
        return
    assert entries and len(entries) == len(lines) == len({image for image, _ in entries})
    for image, label in entries:
        assert image == image.strip() and image
        assert label >= (-1 if allow_open else 0)
        assert num_classes is None or label < num_classes
        assert allow_outside_root or not leaves_root(image)


@st.composite
def curation_cases(draw):
    num_classes = draw(st.integers(2, 6))
    # 0-30 images per class, mostly enough for the profile so that most tables curate.
    train = draw(st.lists(st.one_of(st.integers(0, 30), st.integers(14, 30), st.integers(14, 30)),
                          min_size=num_classes, max_size=num_classes))
    test = draw(st.one_of(st.none(), st.lists(st.one_of(st.integers(0, 10), st.integers(3, 10)),
                                              min_size=num_classes, max_size=num_classes)))
    known = draw(st.one_of(st.none(), st.integers(1, num_classes)))
    open_ = draw(st.one_of(st.none(), st.integers(0, num_classes - (known or 1))))
    max_count = draw(st.integers(1, 10))
    return {
        "train": train, "test": test, "known": known, "open": open_,
        "profile": draw(st.sampled_from(["exp", "pareto"])),
        "max_count": max_count,
        "min_count": draw(st.integers(1, max_count + 1)),
        "val_per_class": draw(st.integers(1, 3)),
        "test_per_class": draw(st.one_of(st.none(), st.integers(1, 3))),
        "seed": draw(st.integers(0, 3)),
    }


def _feasible(case: dict) -> bool:
    """Enough images in every class for any choice of known classes and ranks."""
    if case["min_count"] > case["max_count"] or (case["known"] is None and case["open"] is not None
                                                 and case["open"] >= len(case["train"])):
        return False
    if case["test"] is None:
        if case["test_per_class"] is None:
            return False  # default 50 test images per class: more than any class here has
        need_test = case["test_per_class"]
    else:
        need_test = 0
        if min(case["test"]) < (case["test_per_class"] or 1):
            return False
    need = case["max_count"] + case["val_per_class"] + need_test
    return min(case["train"]) >= need


@SETTINGS
@given(curation_cases())
def test_curation_of_any_class_table_gives_valid_splits_or_input_error(scratch, case) -> None:
    names = [f"c{i}" for i in range(len(case["train"]))]
    source = Source(
        name="generated",
        class_names=names,
        train=[(f"c{i}/train{j}.png", i) for i, n in enumerate(case["train"]) for j in range(n)],
        test=None if case["test"] is None else [
            (f"c{i}/test{j}.png", i) for i, n in enumerate(case["test"]) for j in range(n)],
        image_root=scratch(),
    )
    out = scratch() / "out"
    try:
        manifest = curate(
            source, out, seed=case["seed"], known=case["known"], open=case["open"],
            profile=case["profile"], max_count=case["max_count"], min_count=case["min_count"],
            val_per_class=case["val_per_class"], test_per_class=case["test_per_class"],
            verify_images=False,
        )
    except InputError as error:
        event("refused")
        assert str(error) and not out.exists()
        assert not _feasible(case), f"feasible case refused: {error}"
        return
    event("curated")
    known, opened = manifest["known_classes"], manifest["open_classes"]
    assert known and not set(known) & set(opened)
    splits = {name: read_split_lines(out / f"{name}.txt")[0]
              for name in ("train", "val", "test", "open") if (out / f"{name}.txt").exists()}
    keys = [key for entries in splits.values() for key, _ in entries]
    assert len(keys) == len(set(keys))  # splits are disjoint
    expected = class_counts(case["profile"], len(known), max_count=case["max_count"],
                            min_count=case["min_count"]).tolist()
    assert manifest["counts"]["train"] == expected
    assert Counter(label for _, label in splits["train"]) == dict(enumerate(expected))
    for name, per_class in (("val", case["val_per_class"]),
                            ("test", manifest["test_per_class"])):
        assert Counter(label for _, label in splits[name]) == {k: per_class
                                                               for k in range(len(known))}
    for name in ("train", "val", "test"):
        for key, label in splits[name]:
            assert key.split("/")[0] == known[label]
            assert ("/test" in key) == (name == "test" and case["test"] is not None)
    for key, label in splits.get("open", []):
        assert label == -1 and key.split("/")[0] in opened
    assert load_benchmark(out).train_counts.tolist() == expected

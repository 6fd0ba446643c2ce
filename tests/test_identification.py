"""Face identification (paper Tab. 4): known answers on hand-built embeddings (issue 13)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from oltr.errors import InputError
from oltr.evaluation import (
    IdentificationProtocol,
    Vectors,
    evaluate_identification,
    identification_trials,
    pseudo_shot_counts,
    read_attributes,
    shot_groups,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Leave-one-out probe set (the probes are their own gallery), unit vectors in 2-D:
# identity 0 at 0°, ≈36.9°, ≈53.1°; identity 1 at 90° (no mate); identity 2 at 180° (no mate).
# Pairwise cosines: a0·a1 = 0.8, a0·a2 = 0.6, a1·a2 = 0.96, a1·b = 0.6, a2·b = 0.8.
PROBES = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], np.float32)
PROBE_IDS = [0, 0, 0, 1, 2]
# d0 at 90° (cos to a0, a1, a2: 0, 0.6, 0.8); d1 at 60° (0.5, 0.9196, 0.9928).
DISTRACTORS = np.array([[0.0, 1.0], [0.5, math.sqrt(3) / 2]], np.float32)


def test_all_mode_leave_one_out_without_distractors():
    hits, trials = identification_trials(PROBES, PROBE_IDS)
    # identities 1 and 2 have one image each: no mate, no trial.
    assert trials.tolist() == [1, 1, 1, 0, 0]
    assert hits.tolist() == [1, 1, 1, 0, 0]


def test_all_mode_distractor_steals_the_top1():
    # a2: best mate a1 (0.96) < d1 (0.9928) → miss; a1: 0.96 > d1 (0.9196) → hit.
    hits, trials = identification_trials(PROBES, PROBE_IDS, distractors=DISTRACTORS)
    assert (hits.tolist(), trials.tolist()) == ([1, 1, 0, 0, 0], [1, 1, 1, 0, 0])
    result = evaluate_identification(PROBES, PROBE_IDS, distractors=DISTRACTORS)
    assert result["rank1"] == pytest.approx(2 / 3)
    assert (result["hits"], result["trials"], result["probes"]) == (2, 3, 3)
    assert result["probes_without_mate"] == 2
    assert (result["leave_one_out"], result["gallery"], result["distractors"]) == (True, 5, 2)


def test_megaface_mode_one_mate_per_trial():
    # Each (probe, mate) pair is a trial against the distractors only:
    # a0: mates 0.8, 0.6 vs best distractor 0.5 → 2/2; a1: 0.8, 0.96 vs 0.9196 → 1/2;
    # a2: 0.6, 0.96 vs 0.9928 → 0/2. Total 3/6.
    hits, trials = identification_trials(PROBES, PROBE_IDS, distractors=DISTRACTORS,
                                         gallery_mode="megaface")
    assert (hits.tolist(), trials.tolist()) == ([2, 1, 0, 0, 0], [2, 2, 2, 0, 0])
    result = evaluate_identification(PROBES, PROBE_IDS, distractors=DISTRACTORS,
                                     gallery_mode="megaface")
    assert (result["rank1"], result["hits"], result["trials"]) == (0.5, 3, 6)
    # Without distractors every megaface trial is a hit (the mate is the only candidate).
    hits, trials = identification_trials(PROBES, PROBE_IDS, gallery_mode="megaface")
    assert hits.tolist() == trials.tolist() == [2, 2, 2, 0, 0]


def test_separate_gallery_other_identities_compete_in_all_mode_only():
    probes = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    # Gallery: a wrong identity at cos 0.8 to probe 0 and the mate at cos 0.6.
    gallery = np.array([[0.8, 0.6], [0.6, -0.8], [0.0, 1.0]], np.float32)
    gallery_ids = [7, 0, 1]
    hits, trials = identification_trials(probes, [0, 1], gallery=gallery,
                                         gallery_labels=gallery_ids)
    assert (hits.tolist(), trials.tolist()) == ([0, 1], [1, 1])
    hits, trials = identification_trials(probes, [0, 1], gallery=gallery,
                                         gallery_labels=gallery_ids, gallery_mode="megaface")
    assert (hits.tolist(), trials.tolist()) == ([1, 1], [1, 1])


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
@pytest.mark.parametrize("ties,expected", [("miss", 0), ("hit", 1)])
def test_tie_between_mate_and_wrong_identity_in_any_order(order, ties, expected):
    probe = np.array([[1.0, 0.0]], np.float32)
    gallery = np.array([[2.0, 0.0], [1.0, 0.0]], np.float32)[order]  # both at cos exactly 1
    labels = np.array([5, 0])[order]
    hits, trials = identification_trials(probe, [0], gallery=gallery, gallery_labels=labels,
                                         ties=ties)
    assert (hits.tolist(), trials.tolist()) == ([expected], [1])


@pytest.mark.parametrize("mode,n_trials", [("all", 1), ("megaface", 2)])
def test_tie_with_a_distractor_and_tie_between_mates(mode, n_trials):
    probe = np.array([[0.0, 3.0]], np.float32)
    mates = np.array([[0.0, 1.0], [0.0, 2.0]], np.float32)  # two mates at cos exactly 1
    data = {"gallery": mates, "gallery_labels": [4, 4], "gallery_mode": mode}
    tie = np.array([[0.0, 5.0]], np.float32)  # a distractor at cos exactly 1 too
    hits, trials = identification_trials(probe, [4], distractors=tie, **data)
    assert (hits.tolist(), trials.tolist()) == ([0], [n_trials])
    hits, _ = identification_trials(probe, [4], distractors=tie, ties="hit", **data)
    assert hits.tolist() == [n_trials]
    # Without the tying distractor, the tie between the two mates is a hit under both rules.
    for ties in ("miss", "hit"):
        hits, _ = identification_trials(probe, [4], distractors=np.array([[1.0, 0.0]],
                                                                         np.float32),
                                        ties=ties, **data)
        assert hits.tolist() == [n_trials]


# --------------------------------------------------------------------------- pseudo-shots


def basis(index: int, dim: int = 6, length: float = 1.0) -> np.ndarray:
    vector = np.zeros(dim, np.float32)
    vector[index] = length
    return vector


def reference_set() -> tuple[np.ndarray, np.ndarray]:
    """Reference-model embeddings: shot probe i is the basis vector e_i of R^6; the training
    set holds 7, 5, 2, 1, 0 copies of e_0..e_4 (cos 1), plus for e_0..e_4 one image at cos 0.6
    (below 0.7: not counted) and e_5 orthogonal to every probe."""
    shot_probes = np.stack([basis(i) for i in range(5)])
    rows = [basis(i, length=1.0 + copy) for i, n in enumerate([7, 5, 2, 1, 0])
            for copy in range(n)]
    rows += [0.6 * basis(i) + 0.8 * basis(5) for i in range(5)]
    rows.append(basis(5))
    return shot_probes, np.stack(rows)


def test_pseudo_shot_counts_and_the_strict_threshold():
    shot_probes, train = reference_set()
    assert pseudo_shot_counts(shot_probes, train).tolist() == [7, 5, 2, 1, 0]
    assert pseudo_shot_counts(shot_probes, train, threshold=0.5).tolist() == [8, 6, 3, 2, 1]
    # "greater than": an orthogonal image (cos exactly 0) is not counted at threshold 0.
    assert pseudo_shot_counts(basis(5)[None], train, threshold=0.0).tolist() == [6]
    assert pseudo_shot_counts(shot_probes, train, chunk_size=3,
                              probe_chunk_size=2).tolist() == [7, 5, 2, 1, 0]


def test_groups_per_probe_with_reference_embeddings_and_an_empty_group():
    # Five probes of one identity each with a mate in the gallery (probe i's mate is the
    # gallery row i, at cos 1 to it); probe 1's top-1 is stolen by a distractor.
    probes = np.stack([basis(i) for i in range(5)])
    gallery = probes.copy()
    distractors = 3 * basis(1)[None]  # along e_1: cos 1 to probe 1, a tie with its mate → miss
    shot_probes, train = reference_set()
    result = evaluate_identification(probes, [10, 11, 12, 13, 14], gallery=gallery,
                                     gallery_labels=[10, 11, 12, 13, 14],
                                     distractors=distractors, train=train,
                                     shot_probes=shot_probes, per_probe=True)
    assert result["per_probe"]["pseudo_shots"] == [7, 5, 2, 1, 0]
    assert result["per_probe"]["group"] == ["many", "few", "few", "one", "zero"]
    assert result["per_probe"]["hits"] == [1, 0, 1, 1, 1]
    groups = result["groups"]
    assert list(groups) == ["many", "few", "one", "zero"]
    assert groups["many"] == {"min": 6, "max": None, "rank1": 1.0, "hits": 1, "trials": 1,
                              "probes": 1}
    assert groups["few"] == {"min": 2, "max": 5, "rank1": 0.5, "hits": 1, "trials": 2,
                             "probes": 2}
    assert groups["one"]["rank1"] == groups["zero"]["rank1"] == 1.0
    assert result["rank1"] == pytest.approx(0.8)
    assert result["pseudo_shots"] == {"threshold": 0.7, "source": "train vs shot_probes",
                                      "train": len(train)}
    # Boundaries are configurable: with many ≥ 5 the probe with 5 shots moves to many, and
    # with no probe at 3-4 that group is empty: rank1 null, not 0.
    custom = [("many", 5, None), ("mid", 3, 4), ("low", 0, 2)]
    result = evaluate_identification(probes, [10, 11, 12, 13, 14], gallery=gallery,
                                     gallery_labels=[10, 11, 12, 13, 14],
                                     distractors=distractors, pseudo_shots=[7, 5, 2, 1, 0],
                                     groups=custom)
    assert result["groups"]["many"]["rank1"] == 0.5
    assert result["groups"]["mid"] == {"min": 3, "max": 4, "rank1": None, "hits": 0,
                                       "trials": 0, "probes": 0}
    assert result["groups"]["low"]["rank1"] == 1.0
    assert result["pseudo_shots"]["source"] == "given"
    json.dumps(result)


def test_pseudo_shots_from_the_trained_model_itself():
    # Without shot_probes the probes' own embeddings meet the training set.
    _, train = reference_set()
    probes = np.stack([basis(i) for i in range(5)])
    result = evaluate_identification(probes, [0, 1, 2, 3, 4], gallery=probes,
                                     gallery_labels=[0, 1, 2, 3, 4], train=train,
                                     per_probe=True)
    assert result["per_probe"]["pseudo_shots"] == [7, 5, 2, 1, 0]
    assert result["pseudo_shots"]["source"] == "train vs probes"


def test_shot_group_boundaries_must_partition_the_counts():
    assert [g.describe() for g in shot_groups()] == [">= 6", "2-5", "= 1", "= 0"]
    assert [g.name for g in shot_groups({"hi": (3, None), "lo": (0, 2)})] == ["hi", "lo"]
    with pytest.raises(InputError, match=r"exactly once: no group covers 2 \(value: "):
        shot_groups([("many", 6, None), ("few", 3, 5), ("one", 1, 1), ("zero", 0, 0)])
    with pytest.raises(InputError, match="no group covers 0-1"):
        shot_groups([("many", 6, None), ("few", 2, 5)])
    with pytest.raises(InputError, match="exactly once: 'few' and 'many' overlap"):
        shot_groups([("many", 5, None), ("few", 2, 5), ("low", 0, 1)])
    with pytest.raises(InputError, match="no group covers 6 and above"):
        shot_groups([("few", 1, 5), ("zero", 0, 0)])
    with pytest.raises(InputError, match="names must be unique"):
        shot_groups([("a", 1, None), ("a", 0, 0)])


# --------------------------------------------------------------------------- streaming


def brute_force(probes, probe_ids, gallery, gallery_ids, distractors, train, shot_probes):
    """The definitions with full float64 matrices, for random data (no exact ties)."""
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    probes, gallery, distractors = unit(probes), unit(gallery), unit(distractors)
    similarity = probes @ gallery.T
    mate = probe_ids[:, None] == gallery_ids[None, :]
    best_distractor = (probes @ distractors.T).max(axis=1)
    best_mate = np.where(mate, similarity, -np.inf).max(axis=1)
    best_other = np.maximum(np.where(mate, -np.inf, similarity).max(axis=1), best_distractor)
    all_trials = mate.any(axis=1).astype(int)
    all_hits = (all_trials & (best_mate > best_other)).astype(int)
    mega_trials = mate.sum(axis=1)
    mega_hits = (mate & (similarity > best_distractor[:, None])).sum(axis=1)
    shots = (unit(shot_probes) @ unit(train).T > 0.7).sum(axis=1)
    return (all_hits, all_trials), (mega_hits, mega_trials), shots


def test_chunked_equals_unchunked_equals_brute_force():
    rng = np.random.default_rng(0)
    dim, identities = 8, 15
    probe_ids = rng.integers(0, identities, 37)
    gallery_ids = rng.integers(0, identities + 5, 90)
    centres = rng.normal(size=(identities + 5, dim))
    probes = (centres[probe_ids] + 0.8 * rng.normal(size=(37, dim))).astype(np.float32)
    gallery = (centres[gallery_ids] + 0.8 * rng.normal(size=(90, dim))).astype(np.float32)
    distractors = rng.normal(size=(250, dim)).astype(np.float32)
    shot_probes = rng.normal(size=(37, 4)).astype(np.float32)
    train = (shot_probes[rng.integers(0, 37, 400)] + 0.7 * rng.normal(size=(400, 4))
             ).astype(np.float32)
    expected_all, expected_mega, expected_shots = brute_force(
        probes, probe_ids, gallery, gallery_ids, distractors, train, shot_probes)
    assert 0 < expected_all[0].sum() < expected_all[1].sum()  # a non-trivial case
    assert len(set(expected_shots.tolist())) > 3
    data = {"gallery": gallery, "gallery_labels": gallery_ids, "distractors": distractors,
            "train": train, "shot_probes": shot_probes, "per_probe": True}
    for mode, (hits, trials) in (("all", expected_all), ("megaface", expected_mega)):
        whole = IdentificationProtocol(gallery_mode=mode, chunk_size=10_000,
                                       probe_chunk_size=10_000).evaluate(probes, probe_ids, **data)
        chunked = IdentificationProtocol(gallery_mode=mode, chunk_size=7,
                                         probe_chunk_size=5).evaluate(probes, probe_ids, **data)
        assert chunked == whole
        assert whole["per_probe"]["hits"] == hits.tolist()
        assert whole["per_probe"]["trials"] == trials.tolist()
        assert whole["per_probe"]["pseudo_shots"] == expected_shots.tolist()


def test_npy_files_are_memory_mapped_and_read_in_blocks(tmp_path):
    path = tmp_path / "distractors.npy"
    np.save(path, DISTRACTORS.astype(np.float16))
    vectors = Vectors.from_file(path)
    assert isinstance(vectors._data, np.memmap)
    blocks = list(vectors.blocks(1))
    assert [(start, tuple(rows.shape), rows.dtype) for start, rows in blocks] == [
        (0, (1, 2), torch.float32), (1, (1, 2), torch.float32)]
    hits, _ = identification_trials(PROBES, PROBE_IDS, distractors=path, chunk_size=1)
    assert hits.tolist() == [1, 1, 0, 0, 0]


def test_safetensors_and_label_files(tmp_path):
    save_file({"embeddings": PROBES}, str(tmp_path / "probes.safetensors"))
    np.save(tmp_path / "ids.npy", np.array(PROBE_IDS, np.int32))
    save_file({"a": DISTRACTORS, "embeddings": DISTRACTORS[:1]}, str(tmp_path / "d.safetensors"))
    result = evaluate_identification(tmp_path / "probes.safetensors", tmp_path / "ids.npy",
                                     distractors=str(tmp_path / "d.safetensors"), chunk_size=1)
    # Of the two tensors the one named "embeddings" is used: d0 only, which steals nothing.
    assert (result["hits"], result["trials"], result["distractors"]) == (3, 3, 1)


# --------------------------------------------------------------------------- attributes


def test_attribute_subgroups_from_an_identity_file(tmp_path):
    probes = np.stack([basis(i) for i in range(5)])
    path = tmp_path / "gender.tsv"
    path.write_text("# FaceScrub gender\nidentity\tgender\n10\tmale\n11\tfemale\n12\tfemale\n"
                    "13\tmale\n99\tmale\n")
    distractors = (2 * basis(1))[None]  # ties with probe 1's mate: a miss
    result = evaluate_identification(probes, [10, 11, 12, 13, 14], gallery=probes,
                                     gallery_labels=[10, 11, 12, 13, 14],
                                     distractors=distractors, attributes=path)
    assert result["attribute"] == "gender"
    assert result["attributes"] == {
        "female": {"rank1": 0.5, "hits": 1, "trials": 2, "probes": 2},
        "male": {"rank1": 1.0, "hits": 2, "trials": 2, "probes": 2},
    }
    assert result["probes_without_attribute"] == 1  # identity 14 is not listed
    path.write_text("probe_index\tgender\n0\tmale\n1\tfemale\n")
    assert read_attributes(path, [10, 11, 12]) == ("gender", ["male", "female", None])


@pytest.mark.parametrize("text,line,message", [
    ("", None, "no header"),
    ("name\tgender\n", 1, "header must be 'identity<TAB>NAME'"),
    ("identity\tgender\n1\tmale\textra\n", 2, "expected 2 tab-separated fields"),
    ("identity\tgender\n\n1 male\n", 3, r"expected 2 tab-separated fields \(key, value\), got 1"),
    ("identity\tgender\nx1\tmale\n", 2, "the identity is not an integer"),
    ("identity\tgender\n1\t \n", 2, "empty attribute value"),
    ("identity\tgender\n1\tmale\n1\tmale\n", 3, r"repeated identity \(first on line 2\)"),
    ("probe_index\tgender\n3\tmale\n", 2, r"probe index outside \[0, 3\)"),
])
def test_malformed_attribute_files_name_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "attributes.tsv"
    path.write_text(text)
    where = f"{path}:{line}: " if line else f"{path}: "
    with pytest.raises(InputError, match=message) as error:
        read_attributes(path, [0, 1, 2])
    assert str(error.value).startswith(where)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- bad inputs


def bad_file(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif name.endswith(".safetensors"):
        save_file(content, str(path))
    else:
        np.save(path, content)
    return path


@pytest.mark.parametrize("name,content,message", [
    ("v.npy", np.zeros(3, np.float32), "2-D array (N, d), got shape (3,)"),
    ("v.npy", np.zeros((2, 2), np.int64), "must be float32 or float16 (value: 'int64')"),
    ("v.npy", np.zeros((2, 2), np.float64), "must be float32 or float16 (value: 'float64')"),
    ("v.npy", np.zeros((0, 2), np.float32), "non-empty 2-D array (N, d)"),
    ("v.npy", np.array([[1, 0], [np.nan, 1]], np.float32), "row 1 (0-based) has a non-finite"),
    ("v.npy", np.array([[1, 0], [0, 0]], np.float32), "row 1 (0-based) is a zero vector"),
    ("v.npy", b"not an array", "not a readable .npy array"),
    ("v.safetensors", b"garbage", "not a readable .safetensors file"),
    ("v.safetensors", {"e": np.zeros((2, 2), np.int32)}, "tensor 'e' must be F32, F16 or BF16"),
    ("v.safetensors", {"e": np.zeros((2, 2, 2), np.float32)}, "tensor 'e' must be 2-D"),
    ("v.safetensors", {"a": np.ones((2, 2), np.float32), "b": np.ones((2, 2), np.float32)},
     "holds 2 tensors; name the one to use"),
    ("v.txt", b"1 2\n", "unknown embeddings file type"),
])
def test_bad_vector_files_give_one_line_errors_naming_the_file(tmp_path, name, content, message):
    path = bad_file(tmp_path, name, content)
    with pytest.raises(InputError) as error:
        identification_trials(path, [0, 0], gallery=PROBES[:2], gallery_labels=[0, 0])
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


@pytest.mark.parametrize("call,message", [
    (lambda: identification_trials(PROBES, [0, 1]), "probe labels have 2 entries but there are 5"),
    (lambda: identification_trials(PROBES, PROBE_IDS, gallery=PROBES),
     "needs its identity labels"),
    (lambda: identification_trials(PROBES, PROBE_IDS, gallery_labels=PROBE_IDS),
     "gallery labels were given without a gallery"),
    (lambda: identification_trials(PROBES, PROBE_IDS, distractors=np.ones((2, 3), np.float32)),
     "distractor embeddings have dimension 3 but probe embeddings have 2"),
    (lambda: identification_trials(PROBES, [0.5] * 5), "probe labels must be integers"),
    (lambda: identification_trials(PROBES, PROBE_IDS, gallery_mode="first"),
     "unknown gallery mode"),
    (lambda: identification_trials(PROBES, PROBE_IDS, chunk_size=0), "chunk_size must be"),
    (lambda: IdentificationProtocol(ties="lowest index"), "unknown tie rule"),
    (lambda: identification_trials("missing.npy", PROBE_IDS), "embeddings file not found"),
    (lambda: IdentificationProtocol(threshold=1.5), "threshold must be a cosine in"),
    (lambda: evaluate_identification(PROBES, PROBE_IDS, pseudo_shots=[1, 2, 3, 4, -1]),
     "pseudo-shot counts must be >= 0"),
    (lambda: evaluate_identification(PROBES, PROBE_IDS, pseudo_shots=[1] * 5, train=PROBES),
     "either pseudo_shots or train"),
    (lambda: evaluate_identification(PROBES, PROBE_IDS, shot_probes=PROBES),
     "shot_probes needs the training-set embeddings"),
    (lambda: evaluate_identification(PROBES, PROBE_IDS, train=PROBES, shot_probes=PROBES[:2]),
     "shot_probes have 2 rows but there are 5 probes"),
    (lambda: evaluate_identification(PROBES, PROBE_IDS, attributes=["m", "f"]),
     "attributes have 2 entries but there are 5 probes"),
])
def test_bad_arguments(call, message):
    with pytest.raises(InputError, match=message):
        call()

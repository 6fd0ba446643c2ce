"""The paper's four benchmarks end to end on generated stand-ins (tests/helpers/standins.py):
every command of docs/reproduction.md, run as written with stand-in paths and tiny settings,
and known-answer tests of what those commands rely on (MS1M-LT's proportional sampling,
given splits, the trainval: source, class orders, the published open folder, checkpoints as
pretrained weights)."""
from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from oltr.cli import main
from oltr.config import load_config
from oltr.data import curate, load_benchmark, parse_source
from oltr.data.given import curate_given
from oltr.data.images import load_image
from oltr.data.profiles import keep_probabilities
from oltr.errors import InputError
from oltr.evaluation.external_open_sets import open_set_entries
from oltr.evaluation.identification import evaluate_identification
from oltr.inference import eval_transform, load_model
from oltr.models.backbones import create_backbone

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import standins

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "reproduction.md"
WIDTH = 4
#: What turns a guide command into a seconds-long run on the stand-ins (appended to it).
TINY_TRAIN = [f"model.width={WIDTH}", "data.image_size=32", "train.batch_size=8",
              "train.max_steps_per_epoch=2", "eval.batch_size=64", "data.num_workers=0",
              "eval.many_threshold=6", "eval.few_threshold=4", "train.log_every=1"]
TINY_CURATE = {"imagenet_lt": ["--max-count", "12", "--min-count", "2", "--val-per-class", "2"],
               "places_lt": ["--max-count", "12", "--min-count", "2", "--val-per-class", "2"]}

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- the guide
def guide_commands(text: str) -> tuple[list[tuple[int, str]], set[str]]:
    """The ``oltr`` command lines of every ```sh block (continuations joined, comments
    dropped) with their line numbers, and the variables the blocks assign. AssertionError for
    any other line: a block must hold only what this test runs."""
    commands: list[tuple[int, str]] = []
    assigned: set[str] = set()
    lines = text.splitlines()
    inside = False
    pending, start = "", 0
    for number, raw in enumerate(lines, start=1):
        if raw.startswith("```"):
            inside = raw.strip() == "```sh" if not inside else False
            continue
        if not inside:
            continue
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if pending:
            line = pending + " " + line.strip()
        elif line.strip():
            start = number
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        pending = ""
        line = line.strip()
        if not line:
            continue
        assignment = re.fullmatch(r"([A-Z][A-Z0-9_]*)=\S+", line)
        if assignment:
            assigned.add(assignment.group(1))
            continue
        assert line.startswith("oltr "), f"reproduction.md:{start}: not an oltr command: {line}"
        commands.append((start, line))
    return commands, assigned


def _substitute(line: str, paths: dict[str, Path]) -> list[str]:
    used = re.findall(r"\$\{?([A-Z][A-Z0-9_]*)\}?", line)
    missing = [name for name in used if name not in paths]
    assert not missing, f"no stand-in for ${missing[0]} in: {line}"
    line = re.sub(r"\$\{?([A-Z][A-Z0-9_]*)\}?", lambda m: str(paths[m.group(1)]), line)
    return shlex.split(line)[1:]


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def tiny(argv: list[str]) -> list[str]:
    """The stand-in scale of one guide command (see TINY_TRAIN / TINY_CURATE)."""
    if argv[0] == "train":
        config = load_config(_option(argv, "--method"),
                             benchmark=_option(argv, "--benchmark") or "fmnist_lt")
        stages = [f"{stage['name']}.train.epochs=1" for stage in config["stages"]]
        return [*argv, *TINY_TRAIN, *stages, "--no-progress"]
    if argv[0] == "curate":
        return [*argv, *TINY_CURATE.get(_option(argv, "--protocol") or "", [])]
    return argv


@pytest.fixture(scope="module")
def standin_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every stand-in tree, and the guide's variable → path."""
    root = tmp_path_factory.mktemp("standins")
    face = standins.megaface(root / "megaface")
    return {
        "IMAGENET_LT": standins.imagenet_lt(root / "ImageNet_LT",
                                            standins.imagenet(root / "imagenet")),
        "IMAGENET": root / "imagenet",
        "PLACES_LT": standins.places_lt(root / "Places_LT", standins.places365(root / "places365")),
        "PLACES365": root / "places365",
        "PLACES365_STANDARD": standins.places365_standard(root / "places365_standard"),
        "RESNET152": standins.resnet_state_dict(root / "weights" / "resnet152.pth", "resnet152",
                                                WIDTH),
        "RESNET50": standins.resnet_state_dict(root / "weights" / "resnet50.pth", "resnet50",
                                               WIDTH),
        "MS1M": standins.ms1m(root / "ms1m"),
        "FACESCRUB": face["probes"],
        "DISTRACTORS": face["distractors"],
        "GENDER": face["attributes"],
        "SUN397": standins.sun397(root / "SUN397"),
        "SUN_LT": standins.sun_lt(root / "SUN-LT", root / "SUN397"),
    }


def test_every_guide_command_runs_on_the_standins(standin_data, tmp_path, monkeypatch) -> None:
    commands, assigned = guide_commands(GUIDE.read_text(encoding="utf-8"))
    assert assigned == set(standin_data)  # every variable of the guide has a stand-in
    assert len(commands) >= 25
    monkeypatch.chdir(tmp_path)
    for number, line in commands:
        argv = tiny(_substitute(line, standin_data))
        assert main(argv) == 0, f"reproduction.md:{number}: {line}"

    def report(path: str) -> dict:
        return json.loads((tmp_path / path).read_text())

    # ImageNet-LT from the published lists: the open split is ImageNet_LT_open/'s 6 images
    original = report("runs/imagenet_lt/oltr_original/report.json")
    assert original["shot_rule"] == {"many": ">= 6", "few": "<= 4"}  # the original code's rule
    assert original["open"]["num_open"] == 6  # the paper's rule: max softmax < 0.1 → unknown
    assert original["open"]["threshold"] == pytest.approx(0.9)  # MSP open score = 1 − max p
    assert "probability 0.1" in original["open"]["threshold_source"]
    assert original["open"]["num_known"] == 4 * 3  # ImageNet's 3 val images of 4 classes
    assert report("runs/imagenet_lt/plain_report.json")["stage"] == "stage1"
    paper = report("runs/imagenet_lt/oltr/report.json")
    assert paper["shot_rule"] == {"many": "> 6", "few": "< 4"}
    assert set(paper["detectors"]) == {"energy", "knn"}
    # train counts 12, 6, 4, 3: the boundary classes change group with the rule, nothing else
    assert {k: paper["closed"]["counts"][k] for k in ("many", "medium", "few")} == {
        "many": 1, "medium": 2, "few": 1}
    assert main(["evaluate", "runs/imagenet_lt/oltr", "--data", str(standin_data["IMAGENET_LT"]),
                 "--shot-rule", "original", "--output", "original_rule.json"]) == 0
    other = report("original_rule.json")
    assert other["shot_rule"] == {"many": ">= 6", "few": "<= 4"}
    assert {k: other["closed"]["counts"][k] for k in ("many", "medium", "few")} == {
        "many": 2, "medium": 0, "few": 2}
    assert other["closed"]["overall"] == paper["closed"]["overall"]
    assert other["closed"]["per_class"] == paper["closed"]["per_class"]
    regenerated = report("runs/imagenet_lt/oltr_regenerated/report.json")
    assert "open" not in regenerated  # ILSVRC-2012 alone has no open classes
    assert regenerated["open_sets"]["ImageNet_LT_open"]["num_open"] == 6
    curated = tmp_path / "data" / "imagenet_lt"
    assert (curated / "train.txt").read_text().startswith("train/n0")  # the published form
    assert (curated / "test.txt").read_text().startswith("val/n0")
    # Places-LT: pretrained weights from the local file, the '/'-prefixed open list
    places = report("runs/places_lt/oltr_original/report.json")
    assert places["open"]["num_open"] == 6
    stage1 = (tmp_path / "runs/places_lt/oltr_original/stage1/config.yaml").read_text()
    assert str(standin_data["RESNET152"]) in stage1
    assert report("runs/places_lt/oltr_regenerated/report.json")["open_sets"][
        "Places_LT_open"]["num_open"] == 6
    # MS1M-LT → MegaFace identification, pseudo-shots from the ArcFace run's embeddings
    manifest = json.loads((tmp_path / "data/ms1m_lt/manifest.json").read_text())
    assert manifest["profile"]["name"] == "proportional"
    assert manifest["profile"]["reference_count"] == 24  # the largest identity keeps all
    assert manifest["counts"]["train"][0] == 24
    arcface = report("runs/ms1m_lt/arcface/megaface.json")
    assert arcface["pseudo_shots"]["source"] == "train vs probes"
    for name in ("plain", "oltr"):
        faces = report(f"runs/ms1m_lt/{name}/megaface.json")
        assert faces["kind"] == "identification" and faces["gallery_mode"] == "megaface"
        assert faces["pseudo_shots"]["source"] == "train vs shot_probes"
        assert set(faces["groups"]) == {"many", "few", "one", "zero"}
        assert set(faces["attributes"]) == {"female", "male"}
        assert faces["distractors"] == 8 and faces["trials"] == 4 * 3 * 2  # (probe, mate) pairs
        assert sum(g["probes"] for g in faces["groups"].values()) == faces["probes"] == 12
        assert faces["attributes"]["female"]["probes"] == 6
    model = json.loads((tmp_path / "runs/ms1m_lt/arcface/main/model.json").read_text())
    assert model["model"]["classifier"] == "arcface"
    # the kept embeddings are the network's direct features of the probes, and the report is
    # the protocol's result on them
    embeddings = tmp_path / "runs/ms1m_lt/arcface/embeddings"
    net, info = load_model(tmp_path / "runs/ms1m_lt/arcface/main")
    first = standin_data["FACESCRUB"].parent / "facescrub/person_0/0.jpg"
    image = eval_transform(info["data"])(load_image(first, "RGB")).unsqueeze(0)
    with torch.no_grad():
        direct = net(image).features[0].numpy()
    np.testing.assert_allclose(np.load(embeddings / "probes.npy")[0], direct, rtol=1e-3,
                               atol=1e-3)  # batch of 12, channels_last: float rounding
    again = evaluate_identification(
        embeddings / "probes.npy", embeddings / "probe_labels.npy", gallery_mode="megaface",
        distractors=embeddings / "distractors.npy", train=embeddings / "train.npy",
        attributes=standin_data["GENDER"])
    assert {key: arcface[key] for key in again} == json.loads(json.dumps(again))
    # SUN-LT: the given lists as they are, Tab. 4's accuracy is closed.overall
    given = (standin_data["SUN_LT"] / "SUN-LT_train.txt").read_text().split()
    assert [line.split()[0] for line in (tmp_path / "data/sun_lt/train.txt").read_text()
            .splitlines()] == [path.lstrip("/") for path in given]
    sun = report("runs/sun_lt/oltr/report.json")
    assert "open" not in sun and 0.0 <= sun["closed"]["overall"] <= 1.0
    assert report("runs/sun_lt/plain_report.json")["stage"] == "stage1"


def test_guide_parser_takes_continuations_and_refuses_other_commands() -> None:
    text = "x\n```sh\nA=/a  # where\n# note\noltr train --data $A \\\n    --out r\n```\n"
    assert guide_commands(text) == ([(5, "oltr train --data $A --out r")], {"A"})
    with pytest.raises(AssertionError, match="not an oltr command"):
        guide_commands("```sh\npython run.py\n```\n")


# --------------------------------------------------------------------------- MS1M-LT sampling
def test_keep_probabilities_are_proportional_to_class_size() -> None:
    """p_i = min(1, n_i / Z), Z = the largest count unless given (hand-computed)."""
    np.testing.assert_allclose(keep_probabilities([10, 5, 2, 0]), [1.0, 0.5, 0.2, 0.0])
    np.testing.assert_allclose(keep_probabilities([10, 5, 2], reference_count=4),
                               [1.0, 1.0, 0.5])
    with pytest.raises(ValueError, match=">= 0"):
        keep_probabilities([3, -1])
    with pytest.raises(ValueError, match="integers"):
        keep_probabilities([1.5, 2.0])
    with pytest.raises(ValueError, match="reference_count must be >= 1"):
        keep_probabilities([3, 1], reference_count=0)


def test_proportional_curation_matches_the_hand_computed_expectation(tmp_path) -> None:
    """Identities of 20, 10 and 4 images: p = 1, 1/2, 1/5, so the expected train counts are
    n²/20 = 20, 5 and 0.8 (the head keeps every image, every time); val comes from the images
    not kept, so the head has none."""
    source = parse_source(f"folder:{standins.ms1m(tmp_path / 'ids', (20, 10, 4))}")
    kept = np.zeros((120, 3))
    dropped = 0
    for seed in range(len(kept)):
        manifest = curate(source, tmp_path / f"out{seed}", seed=seed, profile="proportional",
                          val_per_class=1, verify_images=False)
        counts = dict(zip(manifest["known_classes"], manifest["counts"]["train"]))
        kept[seed] = [counts.get(name, 0) for name in ("0", "1", "2")]
        dropped += len(manifest.get("dropped_classes", []))
        assert manifest["counts"]["train"] == sorted(manifest["counts"]["train"], reverse=True)
        assert manifest["counts"]["val"][0] == 0  # the head kept all of its images
    assert (kept[:, 0] == 20).all()
    # binomial means 5 and 0.8 (sd of the mean over 120 draws: 0.14 and 0.07)
    assert abs(kept[:, 1].mean() - 5.0) < 0.5 and abs(kept[:, 2].mean() - 0.8) < 0.25
    # P(identity of 4 keeps none) = 0.8⁴ = 0.41: it vanishes about that often
    assert abs(dropped / len(kept) - 0.8 ** 4) < 0.15
    first = (tmp_path / "out0" / "train.txt").read_bytes()
    curate(source, tmp_path / "again", seed=0, profile="proportional", val_per_class=1,
           verify_images=False)
    assert (tmp_path / "again" / "train.txt").read_bytes() == first  # seeded


def test_proportional_profile_refuses_fixed_count_settings(tmp_path, capsys) -> None:
    ids = standins.ms1m(tmp_path / "ids", (6, 3))
    code = main(["curate", f"folder:{ids}", "--profile", "proportional", "--max-count", "5",
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "--max-count does not apply to the proportional profile" in (
        capsys.readouterr().err)
    with pytest.raises(InputError, match="class_order does not apply"):
        curate(f"folder:{ids}", tmp_path / "out", profile="proportional", class_order="size")


# --------------------------------------------------------------------------- class order
def test_class_order_size_and_names(tmp_path) -> None:
    source = parse_source(f"folder:{standins.ms1m(tmp_path / 'c', (5, 9, 7))}")
    by_size = curate(source, tmp_path / "a", known=None, max_count=6, min_count=2,
                     val_per_class=1, test_per_class=1, class_order="size", verify_images=False)
    assert by_size["known_classes"] == ["1", "2", "0"]  # 9, 7, 5 images
    assert by_size["profile"]["class_order"] == "size"
    named = curate(source, tmp_path / "b", max_count=3, min_count=1, val_per_class=1,
                   test_per_class=1, class_order=["2", "0", "1", "unused"], verify_images=False)
    assert named["known_classes"] == ["2", "0", "1"]
    with pytest.raises(InputError, match="class order lacks 1 known classes"):
        curate(source, tmp_path / "c2", max_count=3, min_count=1, val_per_class=1,
               test_per_class=1, class_order=["2", "0"], verify_images=False)


# --------------------------------------------------------------------------- sources
def test_trainval_source_reads_train_and_val_folders(tmp_path) -> None:
    root = standins.imagenet(tmp_path / "imagenet", classes=2, train=3, val=2)
    source = parse_source(f"trainval:{root}")
    assert source.class_names == standins.WNIDS[:2]
    assert source.train[0] == (f"train/{standins.WNIDS[0]}/{standins.WNIDS[0]}_10026.JPEG", 0)
    assert source.test is not None and len(source.test) == 4
    assert source.test[-1] == (f"val/{standins.WNIDS[1]}/ILSVRC2012_val_00000004.JPEG", 1)
    standins.image(root / "val" / "n99999999" / "x.JPEG", 0, 0)
    with pytest.raises(InputError, match="val class folder has no train folder"):
        parse_source(f"trainval:{root}")


def test_given_lists_are_kept_and_val_drawn_from_unused_images(tmp_path) -> None:
    sun = standins.sun397(tmp_path / "SUN397", per_class=6)
    lists = standins.sun_lt(tmp_path / "lists", sun, counts=(3, 2, 1, 1, 1), test=2)
    manifest = curate_given(lists, sun, tmp_path / "out", val_per_class=2, seed=0)
    assert manifest["known_classes"] == [name for name in standins.SUN_CLASSES]
    assert manifest["counts"] == {"train": [3, 2, 1, 1, 1], "val": [1, 2, 2, 2, 2],
                                  "test": [2] * 5, "open": 0}
    out = {split: [line.split() for line in (tmp_path / "out" / f"{split}.txt").read_text()
                   .splitlines()] for split in ("train", "val", "test")}
    assert [path for path, _ in out["train"]] == [
        line.lstrip("/") for line in (lists / "SUN-LT_train.txt").read_text().split()]
    listed = {path for split in ("train", "test") for path, _ in out[split]}
    for path, label in out["val"]:  # unused images of the right class
        assert path not in listed and path.startswith(standins.SUN_CLASSES[int(label)] + "/")
    assert load_benchmark(tmp_path / "out").num_classes == 5

    labelled = tmp_path / "labelled"  # the split-file form, SUN397's file names
    labelled.mkdir()
    for name, split in (("Training_01.txt", "train"), ("Testing_01.txt", "test")):
        (labelled / name).write_text("".join(f"{p} {k}\n" for p, k in out[split]))
    again = curate_given(labelled, sun, tmp_path / "out2", val_per_class=2, seed=0)
    assert again["counts"]["val"] == [1, 2, 2, 2, 2]
    assert again["profile"]["form"] == "path label"

    unused = next(path for path, label in out["val"] if label == "0")  # a class-0 image
    with (labelled / "Testing_01.txt").open("a") as handle:
        handle.write(f"{unused} 1\n")
    with pytest.raises(InputError, match="folder 'a/abbey' holds listed images of two classes"):
        curate_given(labelled, sun, tmp_path / "out3")


# --------------------------------------------------------------------------- published layout
def test_published_open_folder_is_the_open_splits_root(tmp_path) -> None:
    imagenet = standins.imagenet(tmp_path / "imagenet", classes=4, train=14, val=2)
    published = standins.imagenet_lt(tmp_path / "ImageNet_LT", imagenet)
    lines = (published / "ImageNet_LT_open.txt").read_text().splitlines()
    (published / "ImageNet_LT_open.txt").write_text(  # the original loader's '/name' form
        "".join(f"/{line}\n" for line in lines))
    bench = load_benchmark(published, image_root=imagenet)
    assert bench.split_root("open") == published / "ImageNet_LT_open"
    assert bench.split_root("test") == imagenet
    assert bench.split("open")[0] == ("n09999999_1.JPEG", -1)
    assert bench.dataset("open")[0][0].shape == (3, standins.SIZE, standins.SIZE)
    assert len(bench.split("train")) == 12 + 6 + 4 + 3
    # the list itself as an external open set reads from the same folder
    entries, root, _ = open_set_entries(published / "ImageNet_LT_open.txt")
    assert root == published / "ImageNet_LT_open" and entries[0] == ("n09999999_1.JPEG", -1)
    # without the folder, the error says which folder the list is read against
    (published / "ImageNet_LT_open").rename(tmp_path / "open-elsewhere")
    with pytest.raises(InputError, match=r"ImageNet_LT_open\.txt:1: open split: its paths start "
                                         r"with '/'.*folder .*ImageNet_LT_open beside the list; "
                                         r"that folder does not exist"):
        load_benchmark(published, image_root=imagenet)


# --------------------------------------------------------------------------- pretrained files
def test_pretrained_checkpoint_wrappers_are_unwrapped(tmp_path) -> None:
    reference = create_backbone("resnet10", width=4)
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v
                                           for k, v in reference.state_dict().items()}}, path)
    loaded = create_backbone("resnet10", width=4, pretrained_path=path)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    torch.save({"epoch": 3}, path)
    with pytest.raises(InputError, match="must be a state dict of tensors"):
        create_backbone("resnet10", width=4, pretrained_path=path)

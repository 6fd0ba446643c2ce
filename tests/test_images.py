"""The one image loader (oltr.data.images): every Pillow mode reaches the model as the image a
person sees, or is refused naming the file and the mode; curation fully decodes (issue 9)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oltr.data import curate, parse_source
from oltr.data.datasets import ImageListDataset
from oltr.data.images import ImageError, as_seen, check_images, load_image
from oltr.data.transforms import build_transform
from oltr.errors import InputError
from oltr.predict import Predictor


def pixels(path: Path, mode: str | None = None) -> np.ndarray:
    return np.asarray(load_image(path, mode))


def save_16bit(path: Path, values: list[int], mode: str = "I;16", fmt: str = "PNG") -> Path:
    dtype = ">u2" if mode == "I;16B" else "<u2"
    data = np.array([values], dtype=dtype).tobytes()
    Image.frombytes(mode, (len(values), 1), data).save(path, format=fmt)
    return path


@pytest.mark.parametrize(("mode", "fmt"), [("I;16", "PNG"), ("I;16B", "TIFF"),
                                           ("I;16", "TIFF")])
def test_16_bit_images_are_scaled_by_1_over_257(tmp_path, mode, fmt):
    path = save_16bit(tmp_path / f"x.{fmt.lower()}", [0, 32896, 65535, 257, 385, 386], mode, fmt)
    assert Image.open(path).mode.startswith("I")
    assert pixels(path, "L").tolist() == [[0, 128, 255, 1, 1, 2]]  # 385/257 = 1.498, 386: 1.502
    assert pixels(path, "RGB")[0, 1].tolist() == [128, 128, 128]
    assert load_image(path).mode == "L"


def test_a_dark_and_a_bright_16_bit_image_reach_the_model_differently(tmp_path):
    save_16bit(tmp_path / "dark.png", [1000] * 4)
    save_16bit(tmp_path / "bright.png", [60000] * 4)
    dataset = ImageListDataset([("dark.png", 0), ("bright.png", 0)], tmp_path, mode="L")
    dark, bright = dataset[0][0], dataset[1][0]
    assert round(dark[0, 0, 0].item() * 255) == 4  # 1000 / 257 = 3.9
    assert round(bright[0, 0, 0].item() * 255) == 233  # 60000 / 257 = 233.5 → 233 (float32)
    assert not torch.equal(dark, bright)


def test_32_bit_integer_images_are_16_bit_intensities_or_refused(tmp_path):
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert pixels(tmp_path / "i.tif", "L").tolist() == [[0, 128, 255]]
    Image.fromarray(np.array([[-1, 70000]], dtype=np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(ImageError, match=r"wide\.tif: cannot read image \(mode 'I' holds values "
                                         r"-1\.\.70000; oltr reads this mode as 16-bit"):
        load_image(tmp_path / "wide.tif")


def test_float_images_are_intensities_in_0_1_or_refused(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.2]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert pixels(tmp_path / "f.tif", "L").tolist() == [[0, 128, 255, 51]]
    Image.fromarray(np.array([[0.0, 3.5]], dtype=np.float32)).save(tmp_path / "big.tif")
    with pytest.raises(ImageError, match=r"big\.tif: cannot read image \(mode 'F' holds values "
                                         r"0\.\.3\.5; oltr reads this mode as intensities in "
                                         r"\[0, 1\]"):
        load_image(tmp_path / "big.tif")
    Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(ImageError, match=r"values 0\.\.0, with NaN or infinity"):
        load_image(tmp_path / "nan.tif")


def test_bilevel_palette_and_colour_spaces(tmp_path):
    Image.fromarray(np.array([[0, 1]], dtype=bool)).save(tmp_path / "one.png")
    assert Image.open(tmp_path / "one.png").mode == "1"
    assert pixels(tmp_path / "one.png").tolist() == [[0, 255]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0])
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png")
    assert pixels(tmp_path / "p.png").tolist() == [[[10, 20, 30], [200, 100, 0]]]
    Image.new("CMYK", (1, 1), (0, 255, 0, 0)).save(tmp_path / "cmyk.tif")
    assert pixels(tmp_path / "cmyk.tif").tolist() == [[[255, 0, 255]]]
    Image.new("CMYK", (1, 1), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    assert pixels(tmp_path / "cmyk.jpg").shape == (1, 1, 3)
    ycbcr = Image.new("YCbCr", (1, 1), (128, 128, 128))
    assert np.asarray(as_seen(ycbcr)).tolist() == [[[128, 128, 128]]]
    assert np.asarray(as_seen(Image.new("HSV", (1, 1), (0, 255, 255)))).tolist() == [
        [[255, 0, 0]]]
    lab = np.asarray(as_seen(Image.new("LAB", (1, 1), (128, 128, 128))))
    assert lab.tolist() == [[[119, 119, 119]]]  # L* = 50 is sRGB 119 grey
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (1, 1), (255, 0, 102)).save(rgb)
    assert pixels(rgb, "L").tolist() == [[round(0.299 * 255 + 0.114 * 102)]]  # ITU-R 601-2


def test_alpha_is_dropped_the_same_way_for_every_mode(tmp_path):
    """The alpha channel is dropped and the stored colour kept (torchvision's default_loader):
    a fully transparent red pixel reads red in RGBA, LA, P with a transparent index and PA."""
    Image.new("RGBA", (1, 1), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    assert pixels(tmp_path / "rgba.png").tolist() == [[[255, 0, 0]]]
    assert load_image(tmp_path / "rgba.png").mode == "RGB"
    Image.new("LA", (1, 1), (90, 0)).save(tmp_path / "la.png")
    assert pixels(tmp_path / "la.png").tolist() == [[90]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "pt.png", transparency=0)
    opened = Image.open(tmp_path / "pt.png")
    assert opened.mode == "P" and "transparency" in opened.info
    assert pixels(tmp_path / "pt.png").tolist() == [[[255, 0, 0], [0, 0, 255]]]
    pa = Image.new("PA", (1, 1))
    pa.putpalette([255, 0, 0])
    assert np.asarray(as_seen(pa)).tolist() == [[[255, 0, 0]]]
    premultiplied = Image.new("RGBa", (1, 1), (100, 0, 0, 128))  # un-premultiplied: 199
    assert np.asarray(as_seen(premultiplied)).tolist() == [[[199, 0, 0]]]
    assert np.asarray(as_seen(Image.new("La", (1, 1), (100, 128)))).tolist() == [[199]]


def test_every_pillow_mode_has_a_rule_and_others_are_named():
    for mode in Image.MODES:  # Pillow 13: 1 CMYK F HSV I I;16 I;16B I;16L I;16N L LA La LAB ...
        assert as_seen(Image.new(mode, (1, 1))).mode in ("L", "RGB"), mode

    class Odd:  # a mode of an older or newer Pillow outside the rules (e.g. BGR;15)
        mode, info = "BGR;15", {}

    with pytest.raises(ImageError, match=r"x\.raw: cannot read image \(image mode 'BGR;15' is "
                                         r"not supported; save it as 8-bit grey or RGB\)"):
        as_seen(Odd(), "x.raw")  # type: ignore[arg-type]


def truncated_png(path: Path) -> Path:
    Image.effect_noise((64, 64), 50).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def truncated_jpeg(path: Path) -> Path:
    Image.effect_noise((256, 256), 60).convert("RGB").save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def test_errors_name_the_file_and_pickle(tmp_path):
    with pytest.raises(ImageError, match=r"none\.png: image not found"):
        load_image(tmp_path / "none.png")
    with pytest.raises(ImageError, match=r"cut\.png: cannot read image \(image file is truncated"):
        load_image(truncated_png(tmp_path / "cut.png"))
    error = ImageError("cannot read image", tmp_path / "a.png", "why")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.path == error.path and isinstance(copy, InputError)
    located = error.located(tmp_path / "train.txt", 7)
    assert str(located) == f"{tmp_path / 'train.txt'}:7: cannot read image {tmp_path / 'a.png'} (why)"


def test_check_images_fully_decodes_and_reports_the_first_bad_file(tmp_path):
    good = []
    for i in range(5):
        good.append(tmp_path / f"{i}.jpg")
        Image.effect_noise((64, 64), 40).convert("RGB").save(good[-1])
    check_images(good)
    jpeg, png = truncated_jpeg(tmp_path / "cut.jpg"), truncated_png(tmp_path / "cut.png")
    with Image.open(jpeg) as header_only:  # what curation checked before: the header reads
        assert header_only.size == (256, 256)
    with pytest.raises(ImageError, match=r"cut\.jpg: cannot read image") as error:
        check_images([*good, jpeg, png])
    assert f"1 more unreadable image: {png}" in str(error.value)  # all of them in one run
    with pytest.raises(ImageError, match=r"cut\.png: cannot read image"):
        check_images([png, *good, jpeg], workers=2)


def test_curation_refuses_a_truncated_image_it_uses(tmp_path):
    for label in range(2):
        for i in range(6):
            path = tmp_path / "tree" / f"c{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (4, 4), i).save(path)
    truncated_png(tmp_path / "tree" / "c1" / "3.png")
    arguments = {"known": ["c0", "c1"], "max_count": 3, "min_count": 3, "val_per_class": 1,
                 "test_per_class": 2}
    with pytest.raises(InputError, match=r"c1/3\.png: cannot read image \(image file is "
                                         r"truncated"):
        curate(f"folder:{tmp_path / 'tree'}", tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()
    curate(f"folder:{tmp_path / 'tree'}", tmp_path / "out", verify_images=False, **arguments)


def test_sources_datasets_and_predict_read_through_the_loader(tmp_path):
    (tmp_path / "c0").mkdir()
    path = save_16bit(tmp_path / "c0" / "x.png", [32896] * 4)
    source = parse_source(f"folder:{tmp_path}")
    assert np.asarray(source.load_image("c0/x.png")).tolist() == [[128] * 4]
    predictor = Predictor.__new__(Predictor)
    predictor.mode = "L"
    predictor.transform = build_transform("none", train=False, image_size=4, channels=1,
                                          mean=[0.0], std=[1.0])
    assert round(predictor.preprocess(path)[0, 0, 0].item() * 255) == 128

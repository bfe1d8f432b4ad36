"""saltnet.data.image_io.read_image: same output as detectron2's read_image for ordinary images,
3-channel uint8 for every PIL mode, high bit depths rescaled instead of clipped, EXIF orientation
applied, and ImageReadError naming the file for missing / truncated / non-image files."""

import errno
import pickle

import numpy as np
import pytest
from detectron2.data.detection_utils import read_image as d2_read_image
from PIL import Image

from saltnet.data.image_io import (
    ImageNotFoundError,
    ImageReadError,
    _to_8bit,
    input_image_paths,
    read_image,
)


def _rgb_array(h: int = 24, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _check_uint8_hw3(image: np.ndarray, h: int, w: int) -> None:
    assert image.shape == (h, w, 3)
    assert image.dtype == np.uint8
    assert image.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("fmt", ["BGR", "RGB", "L", "YUV-BT.601"])
def test_rgb_jpeg_matches_detectron2(tmp_path, fmt):
    path = str(tmp_path / "rgb.jpg")
    Image.fromarray(_rgb_array()).save(path, quality=90)
    ours, theirs = read_image(path, fmt), d2_read_image(path, fmt)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)


def test_default_format_is_bgr(tmp_path):
    path = str(tmp_path / "rgb.png")
    Image.fromarray(_rgb_array()).save(path)
    np.testing.assert_array_equal(read_image(path), d2_read_image(path, "BGR"))


def test_bgr_and_rgb_channel_order(tmp_path):
    path = str(tmp_path / "red.png")
    Image.new("RGB", (5, 4), (200, 100, 10)).save(path)
    rgb, bgr = read_image(path, "RGB"), read_image(path, "BGR")
    _check_uint8_hw3(rgb, 4, 5)
    _check_uint8_hw3(bgr, 4, 5)
    assert (rgb == [200, 100, 10]).all()
    assert (bgr == [10, 100, 200]).all()
    np.testing.assert_array_equal(bgr, rgb[:, :, ::-1])


def test_greyscale_gives_three_identical_channels(tmp_path):
    grey = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    path = str(tmp_path / "grey.png")
    Image.fromarray(grey, mode="L").save(path)
    image = read_image(path, "BGR")
    _check_uint8_hw3(image, 12, 20)
    for c in range(3):
        np.testing.assert_array_equal(image[:, :, c], grey)
    assert read_image(path, "L").shape == (12, 20, 1)


def test_greyscale_alpha_and_one_bit(tmp_path):
    la = tmp_path / "la.png"
    Image.new("LA", (6, 4), (90, 7)).save(la)
    assert (read_image(str(la), "RGB") == 90).all()

    bits = np.zeros((4, 8), dtype=bool)
    bits[:, ::2] = True
    one = tmp_path / "one.png"
    Image.fromarray(bits).convert("1").save(one)
    image = read_image(str(one), "RGB")
    _check_uint8_hw3(image, 4, 8)
    np.testing.assert_array_equal(image[:, :, 0], np.where(bits, 255, 0))


def test_rgba_drops_alpha_keeping_colours(tmp_path):
    rgb = _rgb_array(10, 12)
    alpha = np.zeros((10, 12, 1), dtype=np.uint8)  # fully transparent: colours must survive
    alpha[:5] = 128
    path = str(tmp_path / "rgba.png")
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA").save(path)
    image = read_image(path, "RGB")
    _check_uint8_hw3(image, 10, 12)
    np.testing.assert_array_equal(image, rgb)


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_image(tmp_path, transparent):
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12)
    indices = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette)
    path = str(tmp_path / "palette.png")
    image.save(path, **({"transparency": 1} if transparent else {}))
    assert Image.open(path).mode == "P"
    out = read_image(path, "RGB")
    _check_uint8_hw3(out, 2, 4)
    colours = np.array(palette[:12], dtype=np.uint8).reshape(4, 3)
    np.testing.assert_array_equal(out, colours[indices])


def test_cmyk_jpeg(tmp_path):
    path = str(tmp_path / "cmyk.jpg")
    Image.new("RGB", (16, 8), (220, 40, 30)).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    image = read_image(path, "RGB")
    _check_uint8_hw3(image, 8, 16)
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), [220, 40, 30], atol=6)
    np.testing.assert_array_equal(read_image(path, "BGR"), image[:, :, ::-1])


def test_16bit_png_is_rescaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 8).round().astype(np.uint16).reshape(8, 64)
    path = str(tmp_path / "depth16.png")
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    image = read_image(path, "BGR")
    _check_uint8_hw3(image, 8, 64)
    grey = image[:, :, 0]
    for c in (1, 2):
        np.testing.assert_array_equal(image[:, :, c], grey)
    assert grey.min() == 0 and grey.max() == 255
    assert np.all(np.diff(grey.reshape(-1).astype(int)) >= 0)  # monotonic gradient
    np.testing.assert_allclose(grey, values / 257.0, atol=0.5 + 1e-6)
    assert (grey < 128).mean() > 0.4  # detectron2's read_image clips nearly all of it to 255
    assert (d2_read_image(path, "BGR") == 255).mean() > 0.9
    np.testing.assert_array_equal(read_image(path, "L")[:, :, 0], grey)


@pytest.mark.parametrize("mode", ["I;16B", "I;16L"])
def test_16bit_byte_orders(mode):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    image = Image.frombytes(
        mode, (4, 1), values.astype(">u2" if mode.endswith("B") else "<u2").tobytes()
    )
    out = np.asarray(_to_8bit(image))
    np.testing.assert_array_equal(out, [[0, 1, 128, 255]])


def test_32bit_int_and_float_scaled_by_max(tmp_path):
    big = np.array([[0, 1000, 4000]], dtype=np.int32)
    path = str(tmp_path / "int32.tif")
    Image.fromarray(big, mode="I").save(path)
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(read_image(path, "RGB")[:, :, 0], [[0, 64, 255]])

    small = np.array([[0.0, 17.4, 200.0, -3.0]], dtype=np.float32)  # max <= 255: kept as is
    path = str(tmp_path / "float.tif")
    Image.fromarray(small, mode="F").save(path)
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(read_image(path, "RGB")[:, :, 1], [[0, 17, 200, 0]])
    # format=None keeps the raw pixels, as detectron2 does
    assert read_image(path, None).dtype == np.float32


def test_exif_orientation_is_applied(tmp_path):
    rgb = _rgb_array(10, 30)  # wide image; orientation 6 = rotate 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    path = str(tmp_path / "rotated.jpg")
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    image = read_image(path, "RGB")
    _check_uint8_hw3(image, 30, 10)
    expected = np.rot90(np.asarray(Image.open(path).convert("RGB")), k=-1)
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(read_image(path, "BGR"), d2_read_image(path, "BGR"))


def test_truncated_jpeg_raises_naming_file(tmp_path):
    path = tmp_path / "truncated.jpg"
    Image.fromarray(_rgb_array(64, 64)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated.jpg") as info:
        read_image(str(path))
    assert "truncated" in str(info.value).split("truncated.jpg", 1)[1]
    assert info.value.file_name == str(path)
    assert isinstance(info.value, OSError)
    assert info.value.__cause__ is not None


def test_missing_file_raises_naming_file(tmp_path):
    path = str(tmp_path / "does_not_exist.png")
    with pytest.raises(ImageReadError, match="does_not_exist.png") as info:
        read_image(path)
    assert isinstance(info.value, ImageNotFoundError)
    assert isinstance(info.value, FileNotFoundError)
    assert "not found" in str(info.value)
    assert info.value.errno == errno.ENOENT
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is ImageNotFoundError and str(copy) == str(info.value)


def test_text_file_raises_naming_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageReadError, match="notes.jpg") as info:
        read_image(str(path))
    assert not isinstance(info.value, FileNotFoundError)
    assert "not a recognised image" in str(info.value)


def test_unsupported_format_raises_naming_file(tmp_path):
    path = str(tmp_path / "rgb.png")
    Image.fromarray(_rgb_array()).save(path)
    with pytest.raises(ImageReadError, match="rgb.png"):
        read_image(path, "NOT-A-MODE")


def test_input_image_paths_globs_one_argument_and_checks_several(tmp_path, monkeypatch):
    for name in ("b.png", "a.png", "c.jpg"):
        (tmp_path / name).write_bytes(b"")
    assert input_image_paths([str(tmp_path / "*.png")]) == [
        str(tmp_path / "a.png"),
        str(tmp_path / "b.png"),
    ]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert input_image_paths(["~/c.jpg"]) == [str(tmp_path / "c.jpg")]
    given = [str(tmp_path / "c.jpg"), str(tmp_path / "a.png")]
    assert input_image_paths(given) == given  # several: as given, in their order
    with pytest.raises(FileNotFoundError, match=r"--input '.*\*\.gif' matches no file\."):
        input_image_paths([str(tmp_path / "*.gif")])
    with pytest.raises(FileNotFoundError, match=r"no such file: '.*d\.png'\.$"):
        input_image_paths([str(tmp_path / "a.png"), str(tmp_path / "d.png")])

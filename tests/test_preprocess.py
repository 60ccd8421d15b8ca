"""The one preprocessing record: validation, timm's choice for a model, the stored form, and what the transform
does to an image, checked against the same steps done by hand with PIL."""

import json
import re

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import mobile_vmoe.models  # noqa: F401  (registers the model names)
from mobile_vmoe.common import UserError
from mobile_vmoe.preprocess import Preprocess, to_rgb8

GOOD = {
    "size": 16,
    "resize": 20,
    "interpolation": "bilinear",
    "mean": [0.5, 0.4, 0.3],
    "std": [0.2, 0.25, 0.3],
}
WHERE = "run/model.safetensors: metadata 'preprocess'"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"size": 0}, "size must be an integer >= 1, got 0"),
        ({"size": "16"}, "size must be an integer >= 1, got '16'"),
        ({"size": True}, "size must be an integer >= 1, got True"),
        ({"resize": 12}, "resize must be an integer >= size (16), got 12"),
        ({"resize": 20.0}, "resize must be an integer >= size (16), got 20.0"),
        (
            {"interpolation": "lanczos"},
            "interpolation must be one of ['bicubic', 'bilinear', 'nearest'], got 'lanczos'",
        ),
        ({"mean": [0.5, 0.5]}, "mean must be 3 numbers, got (0.5, 0.5)"),
        ({"mean": [0.5, "a", 0.5]}, "mean must be 3 numbers, got (0.5, 'a', 0.5)"),
        ({"mean": [0.5, True, 0.5]}, "mean must be 3 numbers, got (0.5, True, 0.5)"),
        ({"std": [0.2, 0.0, 0.2]}, "std must be 3 numbers > 0, got (0.2, 0.0, 0.2)"),
        (
            {"crop_pct": 0.9},
            "expected keys size, resize, interpolation, mean, std; got ['crop_pct', 'interpolation', ",
        ),
        ({"resize": None}, "resize must be an integer >= size (16), got None"),
    ],
)
def test_stored_record_errors_name_the_file_and_field(change, message):
    d = {**GOOD, **change}
    with pytest.raises(UserError, match="^" + re.escape(f"{WHERE}: {message}")):
        Preprocess.from_dict(d, WHERE)


def test_missing_keys_and_not_an_object():
    with pytest.raises(
        UserError, match=re.escape(f"{WHERE}: expected keys size, resize,") + ".*got \\['size'\\]"
    ):
        Preprocess.from_dict({"size": 16}, WHERE)
    with pytest.raises(UserError, match=re.escape(f"{WHERE}: expected an object with size, resize")):
        Preprocess.from_dict([16, 20], WHERE)
    with pytest.raises(
        ValueError, match=r"size must be .*; std must be 3 numbers > 0"
    ):  # every problem at once
        Preprocess(size=0, resize=20, std=(1.0, 1.0, -1.0))


def test_for_model_224_is_timms_eval_preprocessing():
    model = timm.create_model("mobile_vit_nano_patch16_224", depth=1)
    pre = Preprocess.for_model(model)
    assert (pre.size, pre.resize, pre.interpolation) == (224, 256, "bicubic")  # crop_pct 0.875
    assert pre.mean == tuple(IMAGENET_DEFAULT_MEAN) and pre.std == tuple(IMAGENET_DEFAULT_STD)
    assert pre.crop_pct == pytest.approx(0.875)
    assert Preprocess.for_model(model, crop_pct=1.0).resize == 224
    small = timm.create_model("mobile_vit_nano_patch8_32", depth=2, img_size=16)
    assert Preprocess.for_model(small).size == 16  # img_size= overrides the pretrained cfg's input size


def test_to_dict_from_dict_round_trip():
    pre = Preprocess.from_dict(GOOD, WHERE)
    d = pre.to_dict()
    assert d == GOOD  # lists, not tuples: what JSON holds
    again = Preprocess.from_dict(json.loads(json.dumps(d)), WHERE)
    assert again == pre and again.mean == (0.5, 0.4, 0.3)
    defaults = Preprocess.from_dict({"size": 16, "resize": 16}, WHERE)
    assert defaults.interpolation == "bicubic" and defaults.mean == tuple(IMAGENET_DEFAULT_MEAN)


def _by_hand(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """Resize the shorter side to pre.resize, centre crop pre.size, scale to [0, 1], normalise: [3, size, size]."""
    w, h = img.size
    if w <= h:
        new = (pre.resize, int(pre.resize * h / w))
    else:
        new = (int(pre.resize * w / h), pre.resize)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
    img = img.resize(new, resample[pre.interpolation])
    left, top = int(round((new[0] - pre.size) / 2)), int(round((new[1] - pre.size) / 2))
    img = img.crop((left, top, left + pre.size, top + pre.size))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array(pre.mean, dtype=np.float32)) / np.array(pre.std, dtype=np.float32)
    return x.transpose(2, 0, 1)


@pytest.mark.parametrize(
    "w, h, interpolation", [(50, 30, "bicubic"), (27, 45, "bilinear"), (40, 40, "nearest")]
)
def test_transform_is_resize_shorter_side_then_centre_crop(w, h, interpolation):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    pre = Preprocess(
        size=16, resize=21, interpolation=interpolation, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)
    )
    want = _by_hand(img, pre)
    got = pre.transform()(img)
    assert got.shape == (3, 16, 16) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    arr = pre(img)  # what the host bench feeds a runtime
    assert arr.shape == (1, 3, 16, 16) and arr.dtype == np.float32
    np.testing.assert_allclose(arr[0], want, atol=1e-5)


def test_transform_scales_16_bit_images():
    rng = np.random.default_rng(1)
    a16 = rng.integers(0, 65536, (30, 20), dtype=np.uint16)
    a8 = np.round(a16 / 65535 * 255).astype(np.uint8)
    pre = Preprocess(size=16, resize=16)
    got = pre.transform()(Image.fromarray(a16))  # mode I;16
    np.testing.assert_allclose(got.numpy(), _by_hand(Image.fromarray(a8).convert("RGB"), pre), atol=1e-5)


def test_to_rgb8_modes():
    rgb = Image.fromarray(np.arange(24, dtype=np.uint8).reshape(2, 4, 3))
    np.testing.assert_array_equal(np.asarray(to_rgb8(rgb)), np.asarray(rgb))
    i32 = Image.fromarray(np.array([[0, 256, 65535]], dtype=np.int32))  # mode I holding 16-bit values
    assert np.asarray(to_rgb8(i32))[..., 0].tolist() == [[0, 1, 255]]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))  # mode F in [0, 1]
    assert np.asarray(to_rgb8(f))[..., 0].tolist() == [[0, 128, 255]]
    assert to_rgb8(Image.new("CMYK", (2, 2))).mode == "RGB"

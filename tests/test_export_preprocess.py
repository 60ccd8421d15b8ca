"""One preprocessing from training to the phone: a 224 px .pte fed the way an app feeds it (raw image files
through the sidecar's Preprocess: resize the shorter side to 256, centre crop 224) reproduces
``mobile_vmoe.evaluate.evaluate``'s top-1 and its predictions on the same non-square images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
from mobile_vmoe.export import export_model
from PIL import Image

import mobile_vmoe.models  # noqa: F401  (registers the model names)
from mobile_vmoe.checkpoint import ModelMeta, TrainInfo, load_model, read_meta, save_model
from mobile_vmoe.evaluate import evaluate
from mobile_vmoe.files.sidecar import read_sidecar, sidecar_path
from mobile_vmoe.preprocess import Preprocess

MODEL, KWARGS = "mobile_vit_nano_patch16_224", {"depth": 2, "num_classes": 3}
CLASSES = ["blue", "green", "red"]


def image_folder(root: Path, per_class: int) -> list[tuple[Path, int]]:
    """DIR/{train,val}/<class>/*.png, 300 x 260 RGB (wider than tall: the crop cuts the sides); -> val files."""
    rng = np.random.default_rng(0)
    val = []
    for c, name in enumerate(CLASSES):
        for split, n in (("train", 1), ("val", per_class)):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(
                    0, 120, (260, 300, 3)
                )  # noise, then the class's colour ramping left to right
                a[..., c] += np.linspace(0, 135, 300).astype(np.int64)[None, :]
                Image.fromarray(a.astype(np.uint8)).save(d / f"{i}.png")
                if split == "val":
                    val.append((d / f"{i}.png", c))
    return val


def run_pte(path: Path, x: torch.Tensor) -> torch.Tensor:
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    return torch.cat([method.execute([x[i : i + 1].contiguous()])[0] for i in range(x.shape[0])])


def test_pte_with_sidecar_preprocess_reproduces_evaluate(tmp_path):
    val = image_folder(tmp_path / "data", per_class=4)
    torch.manual_seed(0)
    model = timm.create_model(MODEL, **KWARGS).eval()
    pre = Preprocess.for_model(model, crop_pct=0.875)
    assert (pre.size, pre.resize) == (224, 256)
    meta = ModelMeta(MODEL, KWARGS, CLASSES, pre, TrainInfo(data_dir=str(tmp_path / "data")))
    ckpt = save_model(tmp_path / "model.safetensors", model, meta)

    result = evaluate(ckpt, data_dir=tmp_path / "data")
    out = export_model("pte", tmp_path / "m.pte", checkpoint=ckpt, num_verify=len(val), verbose=False)
    sc = read_sidecar(sidecar_path(out))
    assert sc.preprocess == read_meta(ckpt).preprocess == pre  # copied from the model file, not re-derived

    # What an app does: the raw files through the sidecar's preprocessing, then the .pte.
    tf = sc.preprocess.transform()
    x = torch.stack([tf(Image.open(f)) for f, _ in val])
    labels = torch.tensor([c for _, c in val])
    logits = run_pte(out, x)
    assert result["num_images"] == len(val)
    assert float((logits.argmax(-1) == labels).float().mean()) == result["top1"]
    # Image by image, the predictions of evaluate's pipeline: the model file's model and preprocessing.
    eager_model, eager_meta = load_model(ckpt)
    eager_tf = eager_meta.preprocess.transform()
    with torch.no_grad():
        eager = eager_model(torch.stack([eager_tf(Image.open(f)) for f, _ in val]))
    assert torch.equal(logits.argmax(-1), eager.argmax(-1))
    torch.testing.assert_close(logits, eager, atol=1e-4, rtol=0)
    # The crop matters here: squashing the whole 300 x 260 image to 224 x 224 feeds the model other pixels.
    squash = Image.open(val[0][0]).convert("RGB").resize((224, 224), Image.BICUBIC)
    a = (np.asarray(squash, dtype=np.float32) / 255 - np.asarray(pre.mean)) / np.asarray(pre.std)
    assert not torch.allclose(torch.from_numpy(a.transpose(2, 0, 1)).float(), x[0], atol=0.1)

"""``files.sidecar.exported_from``: whether a resumed export may keep an artifact, each model file hashed once per
export stage (a shared ``digests`` dict)."""

from __future__ import annotations

from mobile_vmoe.files.sidecar import Sidecar, artifact_digest, exported_from, write_sidecar
from mobile_vmoe.preprocess import Preprocess


def _artifact(path, checkpoint) -> None:
    """An "exported" file with its sidecar, recording ``checkpoint``'s digest as an export does."""
    path.write_bytes(b"not a real model")
    sc = Sidecar(
        format="onnx", artifact=path.name, model="mobile_vit_nano_patch8_32", model_kwargs={}, class_names=["a"],
        input_shape=[1, 3, 32, 32], preprocess=Preprocess(size=32, resize=32), precision="fp32",
        checkpoint=str(checkpoint), checkpoint_sha256=artifact_digest(checkpoint)[1],
    )  # fmt: skip
    write_sidecar(path, sc)


def test_exported_from_hashes_each_checkpoint_once_per_shared_digests(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"weights v1")
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    _artifact(a, ckpt)
    _artifact(b, ckpt)
    digests: dict = {}
    assert (
        not exported_from(tmp_path / "none.onnx", ckpt, digests) and digests == {}
    )  # nothing to compare: no hash
    assert exported_from(a, ckpt, digests) and digests == {ckpt: artifact_digest(ckpt)[1]}
    ckpt.write_bytes(b"weights v2")  # retrained: only a fresh dict (a new stage) sees it
    assert exported_from(b, ckpt, digests)  # the stage's digest, not hashed again
    assert not exported_from(b, ckpt, {}) and not exported_from(a, ckpt)

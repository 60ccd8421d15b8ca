"""The benchmark scripts stay runnable: each imports, and the latency scripts' models build and run.

Their real runs lower a dozen ViT-Tiny programs (minutes each); here only what breaks when an API they call
changes: a script that no test ran once called ``for_export`` with a keyword the function no longer took.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


@pytest.fixture(autouse=True)
def on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their helpers (``_common``) by name


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports(name: str) -> None:
    module = importlib.import_module(name)
    if not name.startswith("_"):
        assert callable(module.main), f"benchmarks/{name}.py has no main()"


def _assert_runs(models: dict[str, torch.nn.Module], x: torch.Tensor, out_shape: tuple[int, ...]) -> None:
    with torch.no_grad():
        for key, m in models.items():
            y = m(x)
            assert y.shape == out_shape, key
            assert torch.isfinite(y).all(), key


def test_token_export_latency_models_run() -> None:
    mod = importlib.import_module("token_export_latency")
    models = mod.export_models(quick=True)
    keys = {"dense", *mod.TOKEN, *(k + "_static" for k in mod.TOKEN)}
    assert set(models) == keys
    for key, (E, ratio) in mod.TOKEN.items():
        mlp = models[key].moe_mlps()[0]
        assert (mlp.num_experts, mlp.eval_capacity_ratio, mlp.eval_bpr) == (E, ratio, True), key
    dense = models["dense"]
    x = torch.randn(2, 3, *dense.patch_embed.img_size)
    _assert_runs(models, x, (2, dense.num_classes))


def test_limoe_latency_models_run() -> None:
    mod = importlib.import_module("limoe_latency")
    images, texts = mod.export_models(quick=True)
    assert set(images) == {"limoe", "onetower", "clip", "limoe_2moe", "limoe_static", "limoe_2moe_static"}
    assert set(texts) == {"limoe", "onetower"}
    clf = images["limoe"]
    _assert_runs(images, torch.randn(clf.input_shape), (1, mod.NUM_CLASSES))
    from mobile_vmoe.text import SAMPLE_CAPTIONS, Tokenizer

    tokens = Tokenizer(clf.model.context_length)(SAMPLE_CAPTIONS[:2]).tokens
    _assert_runs(texts, tokens, (2, clf.model.embed_dim))

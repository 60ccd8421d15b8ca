"""Training configuration: one dataclass, small named YAML presets, ``key=value`` overrides (big_vision style).

    cfg = load_config("synthetic", ["model=mobile_vmoe_nano_patch8_32", "optim.lr=2e-3", "model_kwargs.depth=4"])

The dataclass defaults are the DeiT recipe for ImageNet-1k (Touvron et al. 2021, as in timm's train.py), so the
``imagenet1k_<size>`` presets only name the model; the presets for the built-in datasets (``synthetic``,
``digits``, ``quick``) override what a 2-core CPU needs. A preset may ``inherit`` another one.
Overrides use dotted keys; values are parsed as YAML and checked against the field's type; an unknown key is a
``UserError`` naming it. The resolved config is saved as ``RUN/config.yaml`` and can be loaded again as a file;
a resumed run may change only the keys in ``RESUME_MAY_CHANGE``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .common import UserError

__all__ = [
    "Config",
    "load_config",
    "model_kwargs",
    "load_structured",
    "list_presets",
    "config_to_dict",
    "config_changes",
    "config_from_dict",
    "dump_yaml",
    "RESUME_MAY_CHANGE",
]


@dataclass
class DataConfig:
    # "synthetic" | "digits" | an ImageFolder directory (--data / --dataset); ImageNet: --data DIR
    spec: str = ""
    root: str = "data"  # where built-in datasets are built
    # generator options of a built-in dataset; ignored for a directory (a preset's options never block --data)
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 0  # 0: the model's own input size; else the model is built with img_size=image_size
    heldout_fraction: float = 0.01  # google-research/vmoe holds out train[99%:] for the confusion matrix
    heldout_min_per_class: int = 2  # so every class has a row in the held-out confusion matrix
    num_workers: int = 8  # data-loader processes per rank (JPEG decoding + RandAugment are CPU-bound)
    # decode the train and val images once into memory: for small sets (the built-in ones), where PNG decoding,
    # not the model, bounds a step; ImageNet does not fit
    cache_images: bool = False
    # a dataset with more unreadable images than this fraction is refused before training; fewer are skipped
    max_bad_fraction: float = 0.01


@dataclass
class OptimConfig:
    opt: str = "adamw"  # any timm.optim.create_optimizer_v2 name
    lr: float | None = None  # None: base_lr * batch_size / base_batch (DeiT's linear scaling rule)
    base_lr: float = 5e-4  # DeiT: 5e-4 at batch 512
    base_batch: int = 512
    weight_decay: float = 0.05  # DeiT; biases, norms, tokens and expert biases are exempt (no_weight_decay)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = None  # DeiT trains without clipping; set e.g. 1.0 for unstable runs


@dataclass
class ScheduleConfig:
    sched: str = "cosine"  # timm.scheduler.create_scheduler_v2, stepped every update (not every epoch)
    epochs: int = 300  # DeiT
    warmup_epochs: float = 5  # DeiT: 5 epochs of linear warm-up from warmup_lr
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    max_steps: int | None = (
        None  # stop after this many optimizer steps in total (smoke runs); None: all epochs
    )


@dataclass
class AugConfig:
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # DeiT's RandAugment
    hflip: float = 0.5
    color_jitter: float = 0.3  # timm ignores it when RandAugment is on
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (0.75, 4 / 3)  # RandomResizedCrop aspect-ratio range
    interpolation: str = "bicubic"
    reprob: float = 0.25  # random erasing probability
    remode: str = "pixel"
    mixup: float = 0.8  # mixup alpha; 0 disables
    cutmix: float = 1.0  # cutmix alpha; 0 disables
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    mixup_mode: str = "batch"
    label_smoothing: float = 0.1
    drop_path: float = 0.1  # stochastic depth rate (DeiT-Tiny/-Small: 0.1); passed to the model, not saved


@dataclass
class MoEConfig:
    router_loss_weight: float = 0.3  # the paper: L = L_cls + 0.3 * CE(router logits, super-class)
    balance_loss_weight: float = 0.01  # V-MoE importance loss, used only without a super-class map
    importance_loss_weight: float = 0.005  # per-token V-MoE: V-MoE's configs, summed over MoE blocks
    load_loss_weight: float = 0.005  # per-token V-MoE: V-MoE's configs, summed over MoE blocks
    superclasses: str | None = (
        None  # superclasses.json (assignment: super-class of each class); --superclasses
    )


@dataclass
class ImageTextConfig:
    """Contrastive image-text training (LIMoE, dense one-tower, two-tower CLIP; ``train_image_text``)."""

    # LIMoE's entropy losses per modality (image, text), summed over the MoE blocks (models.limoe_losses); the
    # paper sweeps the weights per setting, these are ours
    local_entropy_weight: tuple[float, float] = (0.01, 0.01)
    global_entropy_weight: tuple[float, float] = (0.01, 0.01)
    global_entropy_experts: tuple[float, float] = (0.0, 0.0)  # the hinge's S per modality; 0: S = E
    entropy_losses: bool = True  # false: "LIMoE without entropy losses" (both weights taken as 0)
    # V-MoE's importance and load losses over each modality's tokens (ours: the minority modality is balanced
    # on its own) or over all routed tokens together ("joint": V-MoE's definition, where text can collapse)
    classic_losses: str = "per_modality"
    # caption table columns and separator (open_clip's --csv-img-key / --csv-caption-key / --csv-separator)
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_label_key: str = "label"
    csv_separator: str | None = None
    eval_batch_size: int = 256  # per-epoch zero-shot / retrieval evaluation on the val captions


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1000  # also at the end of every epoch; 0: only at epoch ends
    keep_last: int = 3  # older complete checkpoints are deleted


@dataclass
class Config:
    name: str = "custom"  # preset name; the default run directory is runs/<name>-<model>
    model: str = "mobile_vit_tiny_patch16_224"  # timm name of a mobile_vit_* (dense) or mobile_vmoe_* model
    # to timm.create_model (num_classes from the data if absent); moe_kwargs are added for mobile_vmoe_* and
    # mobile_limoe_* only
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    moe_kwargs: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 1024  # global (all ranks); DeiT: 1024
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    image_text: ImageTextConfig = field(default_factory=ImageTextConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    amp: str = "auto"  # auto: bf16 autocast on CUDA, off on CPU | bf16 | fp16 (with GradScaler) | off
    ema: bool = False  # keep an EMA of the weights (timm ModelEmaV3); the final RUN/model.safetensors is it
    ema_decay: float = 0.99996  # DeiT's value (per step at batch 1024)
    compile: bool = False  # torch.compile the training forward
    seed: int = 0
    out: str = ""  # run directory; "" -> runs/<name>-<model>
    log_interval: int = 50  # optimizer steps between train metric lines
    device: str = "auto"  # auto: cuda:LOCAL_RANK if CUDA is available, else cpu
    threads: int = 0  # torch intra-op threads per process; 0: torch's default
    resume: bool = False  # continue from the newest COMPLETE checkpoint in out (--resume)
    init_from: str | None = None  # model file whose weights initialise the model (--init-from); not a resume
    ddp_find_unused: bool | None = None  # None: on for MoE (unrouted experts get no grad), off for dense
    dump_replicas: bool = False  # DDP debugging: rank r > 0 writes RUN/replica_rank<r>.safetensors at the end


# What a resumed run may change (``train --resume``): how long it runs (a new ``schedule.epochs`` also re-times
# the learning-rate schedule, a function of (config, step)), how it logs, loads data and keeps checkpoints;
# ``out`` because a run directory may be moved; ``resume`` itself. Any other change (model, data, batch, recipe,
# seed, init_from, ...) would make the run a different one: it is refused, naming each changed key.
RESUME_MAY_CHANGE = frozenset(
    {
        "schedule.epochs",
        "schedule.max_steps",
        "log_interval",
        "data.num_workers",
        "data.cache_images",
        "threads",
        "checkpoint.keep_last",
        "checkpoint.every_n_steps",
        "dump_replicas",
        "resume",
        "out",
        "image_text.eval_batch_size",
    }
)


def config_changes(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every leaf that differs between two configs (dict-valued fields included)."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    a, b = flat(config_to_dict(old)), flat(config_to_dict(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


PRESET_PACKAGE = "mobile_vmoe"  # presets are package data: mobile_vmoe/configs/*.yaml


def _preset_dir(kind: str = "") -> Any:
    d = resources.files(PRESET_PACKAGE) / "configs"
    return d / kind if kind else d


def list_presets(kind: str = "") -> list[str]:
    """Preset names: training presets, or with ``kind="pipeline"`` the pipeline presets (configs/pipeline/)."""
    files = _preset_dir(kind).iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml") and not f.name.startswith("_"))


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML ({e})") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a mapping of config keys, got {type(obj).__name__}")
    return obj


def load_source(
    preset_or_file: str, seen: tuple[str, ...] = (), kind: str = ""
) -> tuple[dict[str, Any], str]:
    """YAML of a preset name or file, with ``inherit`` resolved (the child's keys win). Returns (dict, name)."""
    if preset_or_file in seen:
        raise UserError(f"config {preset_or_file!r}: inherit cycle {' -> '.join((*seen, preset_or_file))}")
    path = Path(preset_or_file)
    pkg = _preset_dir(kind) / f"{preset_or_file}.yaml"
    if preset_or_file.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        obj, name = _read_yaml(path.read_text(), str(path)), path.stem
    elif "/" not in preset_or_file and pkg.is_file():
        obj, name = _read_yaml(pkg.read_text(), f"preset {preset_or_file}"), preset_or_file
    else:
        raise UserError(
            f"config {preset_or_file!r}: neither a preset ({', '.join(list_presets(kind))}) nor a YAML file"
        )
    parent = obj.pop("inherit", None)
    if parent is None:
        return obj, name
    base, _ = load_source(str(parent), (*seen, preset_or_file), kind)
    return _merge(base, obj), name


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type ``tp``; UserError naming ``key`` otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"config key {key}: cannot be null")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a directory named 2024
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], key) for v in value)
            if len(value) == len(args):
                return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key + ".")
    else:  # pragma: no cover - a field type this parser does not know
        raise TypeError(f"config field {key}: unsupported type {tp}")
    want = getattr(tp, "__name__", str(tp))
    if origin is tuple:
        want = f"a list of {len(args) if args[-1] is not Ellipsis else 'N'} numbers"
    raise UserError(f"config key {key}: expected {want}, got {value!r}")


def _unknown(key: str, choices: list[str]) -> UserError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], choices, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UserError(f"unknown config key {key!r}{hint}; known keys here: {', '.join(choices)}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in hints:
            raise _unknown(prefix + str(k), names)
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            kwargs[k] = _build(tp, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(v, tp, prefix + k)
    return cls(**kwargs)


def _apply_override(d: dict[str, Any], item: str, root: type | None = None) -> None:
    if "=" not in item:
        raise UserError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-3)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # a plain string YAML cannot parse, e.g. "a: b"
    # Walk the dataclass tree to validate the key; dict-typed fields (model_kwargs, ...) accept any sub-key.
    cls: Any = root or Config
    node = d
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            raise _unknown(".".join(parts[: i + 1]), [f.name for f in dataclasses.fields(cls)])
        tp = hints[part]
        last = i == len(parts) - 1
        if last:
            node[part] = value
            return
        if dataclasses.is_dataclass(tp):
            node = node.setdefault(part, {})
            cls = tp
            continue
        if typing.get_origin(tp) is dict:
            sub = node.setdefault(part, {})
            if not isinstance(sub, dict):
                raise UserError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a mapping")
            sub[".".join(parts[i + 1 :])] = value
            return
        raise UserError(f"override {item!r}: {'.'.join(parts[: i + 1])} has no sub-keys")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (lists for tuples): what RUN/config.yaml and state.pt hold."""

    def plain(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(cfg))


def load_structured(
    cls: type, preset_or_file: str, overrides: typing.Sequence[str] = (), kind: str = ""
) -> Any:
    """A dataclass ``cls`` (with a ``name`` field) from a preset of ``kind`` or a YAML file, then overrides."""
    d, name = load_source(preset_or_file, kind=kind)
    d = _merge({"name": name}, d)
    for item in overrides:
        _apply_override(d, item, cls)
    return _build(cls, d)


def config_from_dict(d: dict[str, Any], where: str) -> Config:
    """A Config from a plain dict (as ``config_to_dict`` makes it), checked as a YAML file would be."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping of config keys, got {type(d).__name__}")
    try:
        return _build(Config, d)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def load_config(preset_or_file: str, overrides: typing.Sequence[str] = ()) -> Config:
    """Preset name (see ``list_presets()``) or YAML file, then ``key=value`` overrides applied in order."""
    cfg = load_structured(Config, preset_or_file, overrides)
    if not cfg.out:
        cfg.out = str(Path("runs") / f"{cfg.name}-{cfg.model}")
    return cfg


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """``model_kwargs``, plus ``moe_kwargs`` when ``cfg.model`` is a Mobile V-MoE or a LIMoE: one preset serves
    the MoE and its dense baselines."""
    moe = cfg.model.startswith(("mobile_vmoe_", "mobile_limoe_"))
    return {**cfg.model_kwargs, **(cfg.moe_kwargs if moe else {})}


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

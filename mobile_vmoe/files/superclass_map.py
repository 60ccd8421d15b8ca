"""``superclasses.json``: the super-class of each class (also a dataset's ``superclasses_true.json``).

assignment        [C] super-class index of each class (index order = the model's class order)
class_names       [C] class names, to check the map belongs to the data/model
num_superclasses  S
sizes             [S] classes per super-class
algorithm         how it was found ("spectral", ..., "ground-truth")
params            what the algorithm was given (seed, checkpoint, ...)
within_mass       share of the held-out confusion that falls within super-classes (null if unknown)
warnings          what the map cannot vouch for (classes with no held-out images, an all-zero matrix)
ari_vs_truth      agreement with the dataset's known super-classes, where it has them
extra             anything else the writer recorded (ari_vs_truth, superclass_names, ...)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common import UserError, read_json, write_json_atomic

__all__ = ["SuperclassMap", "SUPERCLASSES_JSON", "read_superclass_map", "write_superclass_map"]

SUPERCLASSES_JSON = "superclasses.json"
_KEYS = (
    "assignment",
    "class_names",
    "num_superclasses",
    "sizes",
    "algorithm",
    "params",
    "within_mass",
    "warnings",
    "ari_vs_truth",
)


@dataclass
class SuperclassMap:
    assignment: list[int]
    class_names: list[str]
    algorithm: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    within_mass: float | None = None
    warnings: list[str] = field(default_factory=list)
    ari_vs_truth: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_superclasses(self) -> int:
        return max(self.assignment) + 1 if self.assignment else 0

    @property
    def sizes(self) -> list[int]:
        return [self.assignment.count(s) for s in range(self.num_superclasses)]

    def check_classes(self, class_names: list[str], where: str) -> None:
        """The map must describe exactly these classes, in this order."""
        if len(self.assignment) != len(class_names):
            raise UserError(
                f"{where}: 'assignment' has {len(self.assignment)} entries, but the data/model has "
                f"{len(class_names)} classes"
            )
        if self.class_names and self.class_names != list(class_names):
            raise UserError(f"{where}: 'class_names' differ from the data/model's classes")

    def to_dict(self) -> dict[str, Any]:
        return {
            "assignment": self.assignment,
            "class_names": self.class_names,
            "num_superclasses": self.num_superclasses,
            "sizes": self.sizes,
            "algorithm": self.algorithm,
            "params": self.params,
            "within_mass": self.within_mass,
            "warnings": self.warnings,
            "ari_vs_truth": self.ari_vs_truth,
            **self.extra,
        }


def write_superclass_map(path: str | os.PathLike[str], m: SuperclassMap) -> Path:
    write_json_atomic(path, m.to_dict())
    return Path(path)


def read_superclass_map(
    path: str | os.PathLike[str], class_names: list[str] | None = None, what: str = "super-class map"
) -> SuperclassMap:
    """Read and check a map; with ``class_names`` also check it belongs to those classes."""
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object with 'assignment' and 'class_names'")
    a = obj.get("assignment")
    if (
        not isinstance(a, list)
        or not a
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in a)
    ):
        raise UserError(
            f"{path}: 'assignment' must be a non-empty list of integers >= 0 (the super-class of each class)"
        )
    names = obj.get("class_names", [])
    if (
        not isinstance(names, list)
        or not all(isinstance(n, str) for n in names)
        or (names and len(names) != len(a))
    ):
        raise UserError(
            f"{path}: 'class_names' must be a list of {len(a)} strings, one per 'assignment' entry"
        )
    used = set(a)
    if used != set(range(max(a) + 1)):
        raise UserError(f"{path}: 'assignment' skips super-class(es) {sorted(set(range(max(a) + 1)) - used)}")
    if "num_superclasses" in obj and obj["num_superclasses"] != max(a) + 1:
        raise UserError(
            f"{path}: 'num_superclasses' is {obj['num_superclasses']!r}, but 'assignment' uses {max(a) + 1}"
        )
    wm = obj.get("within_mass")
    m = SuperclassMap(
        assignment=list(a),
        class_names=list(names),
        algorithm=str(obj.get("algorithm", "")),
        params=dict(obj.get("params") or {}),
        within_mass=float(wm) if isinstance(wm, (int, float)) else None,
        warnings=[str(w) for w in obj.get("warnings") or []],
        ari_vs_truth=float(obj["ari_vs_truth"])
        if isinstance(obj.get("ari_vs_truth"), (int, float))
        else None,
        extra={k: v for k, v in obj.items() if k not in _KEYS},
    )
    if class_names is not None:
        m.check_classes(class_names, str(path))
    return m

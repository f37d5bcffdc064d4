"""NaN and infinity are refused in every number of a configuration: checks written as `x < 0` let them through
(`nan < 0` is False), and a NaN learning rate, clipping norm or alpha only shows up later as a NaN loss blamed on
something else."""

from __future__ import annotations

import dataclasses
import math

from ..errors import ConfigError

INT64_MAX = 2**63 - 1


def nonfinite_values(value, name: str) -> list[str]:
    """`name` (with an index or key for nested values) for every number in `value` (a number, or a tuple, list or
    dict of them, nested) that is NaN or infinite, or a whole number past 64 bits."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [f"{name} {value}"]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        digits = str(value)
        shown = digits if len(digits) <= 24 else f"{digits[:20]}... ({len(digits)} digits)"
        return [f"{name} {shown}"]  # past 64 bits: it overflows in torch, numpy or the clock later
    if isinstance(value, (tuple, list)):
        return [found for i, item in enumerate(value) for found in nonfinite_values(item, f"{name}[{i}]")]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in nonfinite_values(item, f"{name} {key}")]
    return []


def check_finite(values: dict, error: type[ConfigError] = ConfigError, where: str = "") -> None:
    """Raise `error` naming every option of `values` ({option: value}) that holds NaN or infinity."""
    found = [hit for option, value in values.items() for hit in nonfinite_values(value, option)]
    if found:
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}{', '.join(found)}: expected a finite number, and a whole number within 64 bits (NaN "
                    "and infinity are refused)")


def check_dataclass_finite(instance, error: type[ConfigError] = ConfigError, where: str = "",
                           skip: tuple[str, ...] = ()) -> None:
    """check_finite over the fields of a dataclass instance (nested dataclasses are left to their own checks)."""
    values = {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance) if f.name not in skip}
    check_finite({k: v for k, v in values.items() if not dataclasses.is_dataclass(v)}, error, where)

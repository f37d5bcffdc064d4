"""TOML reading on every supported Python (tomllib from 3.11, the toml package before)."""

from __future__ import annotations

try:
    import tomllib as _reader

    TOMLError = _reader.TOMLDecodeError
except ModuleNotFoundError:  # Python 3.10
    import toml as _reader

    TOMLError = _reader.TomlDecodeError


def loads(text: str) -> dict:
    return _reader.loads(text)


def dumps_flat(values: dict) -> str:
    """A TOML document of top-level keys whose values are strings, booleans, numbers or lists of those (what
    `--output_config` writes); JSON's string escapes are valid TOML basic strings."""
    import json
    import math

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    return "".join(f"{key} = {value(v)}\n" for key, v in values.items())

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

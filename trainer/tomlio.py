"""TOML reading on every supported Python (tomllib from 3.11, the toml package before), and the guards every
TOML/JSON settings file goes through: text decoding (UTF-8 with or without BOM, UTF-16/32 with a BOM; binary files
refused) and a nesting limit (a document nested thousands deep would end the parser in a RecursionError)."""

from __future__ import annotations

import codecs
import json

try:
    import tomllib as _reader

    TOMLError = _reader.TOMLDecodeError
except ModuleNotFoundError:  # Python 3.10
    import toml as _reader

    TOMLError = _reader.TomlDecodeError

# Far deeper than any settings file, far below Python's recursion limit (the parsers recurse once per level).
MAX_NESTING = 100
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


class NotText(ValueError):
    """A settings file's bytes are not text in an encoding it can be read in."""


def _too_deep(text: str) -> str | None:
    """The message for a document whose brackets/braces nest deeper than MAX_NESTING, else None. Brackets inside
    strings count too: an over-estimate only for a document that is absurd anyway."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_NESTING:
                return f"nested more than {MAX_NESTING} levels deep (arrays or tables inside each other)"
        elif char in "]}":
            depth = max(0, depth - 1)
    return None


def _toml_error(message: str) -> Exception:
    try:
        return TOMLError(message)
    except TypeError:  # the toml package's error also takes the document and a position
        return TOMLError(message, "", 0)


def loads(text: str) -> dict:
    """A TOML document; TOMLError for invalid TOML, including one nested deeper than MAX_NESTING."""
    problem = _too_deep(text)
    if problem:
        raise _toml_error(problem)
    return _reader.loads(text)


def loads_json(text: str):
    """A JSON document; json.JSONDecodeError (a ValueError) for invalid JSON, including one nested deeper than
    MAX_NESTING."""
    problem = _too_deep(text)
    if problem:
        raise json.JSONDecodeError(problem, text[:0], 0)
    return json.loads(text)


def decode_text(data: bytes) -> str:
    """A settings file's text: UTF-8 (a BOM is dropped), or UTF-16/UTF-32 when it starts with their BOM (Windows
    editors' "Unicode"). NotText for anything else that is not UTF-8 or that holds NUL characters (UTF-16 without a
    BOM, a binary file): such a file was never meant as this text."""
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        announced = "" if encoding.startswith("utf-8") else f", nor the {encoding.upper()} its first bytes announce"
        raise NotText(f"not UTF-8 text{announced} ({e.reason} at byte {e.start}); save it as UTF-8") from None
    if "\x00" in text:
        raise NotText("holds NUL characters: a binary file, or UTF-16 text without a byte-order mark; save it as "
                      "UTF-8")
    return text.lstrip("\ufeff")


def read_text(path) -> str:
    """decode_text of a file's bytes (OSError when it cannot be read)."""
    from pathlib import Path

    return decode_text(Path(path).read_bytes())


def dumps_flat(values: dict) -> str:
    """A TOML document of top-level keys whose values are strings, booleans, numbers or lists of those (what
    `--output_config` writes); JSON's string escapes are valid TOML basic strings."""
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

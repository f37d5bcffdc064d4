"""sd-scripts' --config_file (the TOML of options the kohya_ss GUI writes) and --output_config."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import ConfigError


def read_config_file(path: str, parser: argparse.ArgumentParser, warn=print) -> list[str]:
    """sd-scripts' --config_file: a TOML of options, its tables flattened (a key in any table is the option of that
    name), turned into command-line words so that each value is converted and checked like a typed one. The
    command line's own words come after these, so they win. Unknown keys are reported and skipped."""
    from .tomlio import TOMLError, loads

    file = Path(path if Path(path).suffix else f"{path}.toml")
    try:
        data = loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"config_file: cannot read {file}: {e.strerror or e}") from None
    except TOMLError as e:
        raise ConfigError(f"config_file: {file} is not valid TOML: {e}") from None
    flat: dict = {}
    for key, value in data.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    known = {a.dest: a for a in parser._actions}
    words, unknown = [], []
    for key, value in flat.items():
        action = known.get(key)
        if action is None or key in ("config_file", "output_config"):
            unknown.append(key)
        elif isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(f"config_file {file}: '{key}' = {value!r}: expected true or false")
            words += [f"--{key}"] if value else []
        elif value is None or (value == "" and action.type is not None and action.type is not str):
            continue  # an empty GUI field: the option is not given
        elif isinstance(value, list):
            words += [f"--{key}", *(str(v) for v in value)]
        else:
            words += [f"--{key}={value}"]
    if unknown:
        warn(f"config_file {file}: not options here, ignored: {', '.join(unknown)}")
    return words


def write_config_file(path: str, ns: argparse.Namespace) -> Path:
    """sd-scripts' --output_config: the options given, as a TOML that --config_file reads back."""
    from .atomic import write_bytes
    from .tomlio import dumps_flat

    values = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(vars(ns).items())
              if k not in ("config_file", "output_config") and v is not None}
    if "resolution" in values:
        values["resolution"] = ",".join(str(v) for v in values["resolution"])
    file = Path(path if Path(path).suffix else f"{path}.toml")
    write_bytes(file, dumps_flat(values).encode("utf-8"))
    return file

"""sd-scripts' --config_file (the TOML of options the kohya_ss GUI writes) and --output_config."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import ConfigError

# Keys that are never options of their own in a config file (sd-scripts drops them too when writing one)
NOT_WRITTEN = ("config_file", "output_config", "wandb_api_key")


def config_file_path(path: str) -> Path:
    """sd-scripts adds .toml to a name that has no suffix."""
    return Path(path if Path(path).suffix else f"{path}.toml")


def _flatten(data: dict) -> dict:
    flat: dict = {}
    for key, value in data.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


def _flag_value(file: Path, key: str, value) -> bool:
    """A store_true option's value: sd-scripts sets the file's value on its namespace as it is, so the kohya_ss
    GUI's 0/1 for a ticked box work like false/true. Anything else (a string, a list) is refused: "false" would be
    true there."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    raise ConfigError(f"config_file {file}: '{key}' = {value!r}: expected true or false (or 1 or 0)")


def _words(file: Path, key: str, value, action: argparse.Action) -> list[str]:
    """The command-line words that give option `key` the value `value`."""
    if isinstance(action, argparse._StoreTrueAction):
        return [f"--{key}"] if _flag_value(file, key, value) else []
    if value is None or (value == "" and action.type is not None and action.type is not str):
        return []  # an empty GUI field: the option is not given
    if isinstance(value, dict):
        raise ConfigError(f"config_file {file}: '{key}' is a table; expected a value")
    if isinstance(value, list):
        if action.nargs not in ("*", "+"):
            raise ConfigError(f"config_file {file}: '{key}' = {value!r}: --{key} takes one value, not a list")
        return [f"--{key}", *(str(v) for v in value)]
    return [f"--{key}={value}"]


def read_config_file(path: str, parser: argparse.ArgumentParser, warn=print) -> list[str]:
    """sd-scripts' --config_file: a TOML of options, its tables flattened (a key in any table is the option of that
    name), turned into command-line words so that each value is converted and checked like a typed one. The
    command line's own words come after these, so they win. Unknown keys are reported and skipped."""
    from .tomlio import NotText, TOMLError, loads, read_text

    file = config_file_path(path)
    try:
        data = loads(read_text(file))
    except OSError as e:
        raise ConfigError(f"config_file: cannot read {file}: {e.strerror or e}") from None
    except NotText as e:
        raise ConfigError(f"config_file: {file} {e}") from None
    except TOMLError as e:
        raise ConfigError(f"config_file: {file} is not valid TOML: {e}") from None
    known = {a.dest: a for a in parser._actions}
    words, unknown = [], []
    for key, value in _flatten(data).items():
        action = known.get(key)
        if action is None or key in NOT_WRITTEN:
            unknown.append(key)
        else:
            words += _words(file, key, value, action)
    if unknown:
        warn(f"config_file {file}: not options here, ignored: {', '.join(unknown)}")
    return words


def given_options(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The options of `ns` that differ from the parser's defaults (what was given), as sd-scripts' --output_config
    keeps them."""
    defaults = {a.dest: a.default for a in parser._actions if a.default is not argparse.SUPPRESS}
    return {k: v for k, v in vars(ns).items()
            if k not in NOT_WRITTEN and v is not None and not (k in defaults and v == defaults[k])}


def write_config_file(path: str, ns: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """sd-scripts' --output_config: the options given, as a TOML that --config_file reads back. An existing file is
    never replaced (sd-scripts refuses it too)."""
    from .atomic import create_new_file
    from .tomlio import dumps_flat

    values = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(given_options(ns, parser).items())}
    if "resolution" in values:
        values["resolution"] = ",".join(str(v) for v in values["resolution"])
    file = config_file_path(path)
    try:
        return create_new_file(file, dumps_flat(values).encode("utf-8"))
    except FileExistsError:
        raise ConfigError(f"--output_config: {file} exists; it is not replaced (give --config_file a new file "
                          "name)") from None

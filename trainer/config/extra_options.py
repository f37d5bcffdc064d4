"""Options typed as command-line text where the rest comes from elsewhere (the ComfyUI train node's
`extra_options`): read by the CLI's own parser, so the syntax, types and messages are the command line's, into a
`Source` for `combine`. An option that would not apply is an error naming it, never dropped: one the front end sets
itself (`refused`, with who sets it), a dataset option where the datasets are typed (it would reach none), and
anything that is not a training option.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping

from ..errors import ConfigError
from .combine import FLOW_FIELDS, Source
from .optim import check_named_only
from .train import FLAG_SECTIONS

PLACEHOLDER = "-"  # stands in for the required model files while parsing (the front end sets the real ones)
REQUIRED = ("pretrained_model_name_or_path", "t5xxl", "ae")


def option_lines(text: str) -> list[str]:
    """Non-empty lines that are not comments (`#`)."""
    return [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not ln.strip().startswith("#")]


def split_line(line: str, option: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as e:
        raise ConfigError(f"{option}: {line!r} cannot be read ({e})") from None


def parse_extra_options(text: str, *, refused: Mapping[str, str], typed_datasets: bool,
                        name: str = "extra_options") -> Source:
    """`text` (`--weighting_scheme logit_normal --huber_c 0.2`, any number of lines, `#` comments) -> the options
    it sets. `refused`: option -> who sets it instead ("the models node"); `typed_datasets`: the datasets come
    whole from elsewhere, so no dataset option applies. Only named optimizers and schedules are taken (the text may
    come from a shared workflow)."""
    tokens = [token for line in option_lines(text) for token in split_line(line, name)]
    if not tokens:
        return Source(name, {})
    given = _option_names(tokens, name)
    for option in given:
        _check_applies(option, refused, typed_datasets, name)
    values = vars(_parse(tokens, name))
    flags = {option: _normalised(option, values[option]) for option in given}
    check_named_only(flags.get("optimizer_type", ""), flags.get("lr_scheduler_type", ""), name)
    return Source(name, flags)


def _option_names(tokens: list[str], name: str) -> list[str]:
    short = [t for t in tokens if t.startswith("-") and not t.startswith("--") and not _is_number(t)]
    if short:
        raise ConfigError(f"{name}: {short[0]}: write options in full, e.g. --huber_c 0.2")
    return list(dict.fromkeys(t[2:].split("=", 1)[0] for t in tokens if t.startswith("--")))


def _check_applies(option: str, refused: Mapping[str, str], typed_datasets: bool, name: str) -> None:
    if typed_datasets and FLAG_SECTIONS.get(option) == "data":
        raise ConfigError(f"{name}: --{option} is a dataset option: set it on the dataset node (a widget, or "
                          f"`{option} = ...` in its extra_options) or in a dataset TOML; here it would reach no "
                          "dataset")
    if option in refused:
        raise ConfigError(f"{name}: --{option} is set by {refused[option]}, not here")
    if option not in FLAG_SECTIONS and option not in FLOW_FIELDS:
        raise ConfigError(f"{name}: --{option} is not a training option taken here")


def _parse(tokens: list[str], name: str) -> argparse.Namespace:
    from ..cli import build_parser  # the command line's parser: one syntax, one set of types and messages

    parser = build_parser()
    parser.allow_abbrev = False  # `--output_d x` must not reach output_dir

    def fail(message: str):
        raise ConfigError(f"{name}: {message}")

    parser.error = fail
    placeholders = [word for option in REQUIRED for word in (f"--{option}", PLACEHOLDER)]
    try:
        return parser.parse_args(placeholders + tokens)
    except argparse.ArgumentError as e:
        fail(str(e))


def _normalised(option: str, value):
    """The parser's lists as the config's tuples; an empty --text_encoder_lr is "not set"."""
    if option == "text_encoder_lr":
        return tuple(value) or None
    if isinstance(value, list):
        return tuple(value)
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True

"""Regular expressions from untrusted text (network_args' network_reg_dims / network_reg_lrs, which a shared ComfyUI
workflow can set) are matched against every layer name; Python's backtracking matcher can take exponential time on
a pattern such as `^(\\w+)+!`. `check_pattern` refuses, before anything is matched, every pattern whose matching
work is not bounded by a small polynomial in the length of a layer name:

- a variable-length repeat (`*`, `+`, `?`, `{m,n}`) or an alternation `a|bc` inside a repeat: the nested choices
  multiply with every character (exponential);
- a back-reference (`\\1`, `(?P=name)`): matching with them is not polynomial at all;
- repeats in sequence whose choices multiply past MAX_WAYS: `.*.*.*.*` already tries ~10^7 splits of a 60-character
  name (each unbounded repeat counts as NAME_LENGTH + 1 ways, `{m,n}` as n - m + 1, `?` as 2).

Ordinary sd-scripts patterns (`.*single_blocks.*`, `lora_unet_double_blocks_\\d+_img_attn.*`, `(q|k|v)_proj`) pass.
"""

from __future__ import annotations

import re

try:  # Python 3.11+
    from re import _constants as sre_constants
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

from ..errors import LoRAConfigError

MAX_PATTERN_LENGTH = 500
MAX_PATTERNS = 64  # per option
NAME_LENGTH = 100  # longer than any layer name of FLUX.1, CLIP-L or T5-XXL
MAX_WAYS = (NAME_LENGTH + 1) ** 3  # three unbounded repeats in sequence

_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT}
_POSSESSIVE = getattr(sre_constants, "POSSESSIVE_REPEAT", None)
_BACKREFERENCES = {sre_constants.GROUPREF, sre_constants.GROUPREF_EXISTS}
_SUBPATTERNS = {sre_constants.SUBPATTERN, sre_constants.ASSERT, sre_constants.ASSERT_NOT}
_ATOMIC = getattr(sre_constants, "ATOMIC_GROUP", None)


class _TooComplex(Exception):
    pass


def check_patterns(option: str, patterns: list[str] | tuple[str, ...]) -> None:
    """Every pattern of `option` compiles and is safe to match (see the module's docstring); else a LoRAConfigError
    naming the option and the pattern."""
    if len(patterns) > MAX_PATTERNS:
        raise LoRAConfigError(f"{option}: {len(patterns)} patterns; at most {MAX_PATTERNS} are taken")
    for pattern in patterns:
        check_pattern(option, pattern)


def check_pattern(option: str, pattern: str) -> None:
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise LoRAConfigError(f"{option}: pattern {pattern[:40]!r}... is {len(pattern)} characters long; at most "
                              f"{MAX_PATTERN_LENGTH} are taken")
    try:
        re.compile(pattern)
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise LoRAConfigError(f"{option}: {pattern!r} is not a valid regular expression ({e})") from e
    try:
        ways = _ways(list(parsed), inside_repeat=False)
    except _TooComplex as e:
        raise LoRAConfigError(f"{option}: pattern {pattern!r} is refused: {e}, so matching it could take longer than "
                              "any run") from None
    if ways > MAX_WAYS:
        raise LoRAConfigError(f"{option}: pattern {pattern!r} is refused: its repeats in a row can split a layer name "
                              f"in too many ways (more than three unbounded ones such as .* or \\d+); matching it "
                              "could take longer than any run (a search finds the pattern anywhere in the name, so "
                              "a leading or trailing .* can simply be left out)")


def _ways(items: list, inside_repeat: bool) -> int:
    """How many ways the sequence `items` can split a name, at most (the product of its repeats' choices)."""
    ways = 1
    for op, arg in items:
        if op in _BACKREFERENCES:
            raise _TooComplex("it refers back to a group (\\1, (?P=name))")
        if op in _REPEATS or (_POSSESSIVE is not None and op == _POSSESSIVE):
            low, high, body = arg
            variable = low != high
            if inside_repeat and variable:
                raise _TooComplex("it has a repeat (*, +, ?, {m,n}) inside another repeat (write it without nesting, "
                                  "e.g. 'double_blocks_\\d+_img' rather than '(\\w+)+')")
            repeats_body = high > 1 or inside_repeat
            body_ways = _ways(list(body), inside_repeat=repeats_body)
            choices = min(high, NAME_LENGTH) - low + 1 if variable else 1
            ways *= max(1, choices) * body_ways
        elif op == sre_constants.BRANCH:
            if inside_repeat:
                raise _TooComplex("it has an alternation (a|bc) inside a repeat")
            ways *= sum(_ways(list(branch), inside_repeat) for branch in arg[1])
        elif op in _SUBPATTERNS:
            ways *= _ways(list(arg[-1]), inside_repeat)
        elif _ATOMIC is not None and op == _ATOMIC:
            ways *= _ways(list(arg), inside_repeat)
    return ways

"""`--help`: every option has a description in this trainer's words, shows its choices, and at most one default."""

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import build_parser, main
from trainer.cli_help import DESCRIPTIONS, VALUE_CHOICES, describe_options, help_text


def _options(parser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def test_every_option_of_the_parser_has_a_description():
    names = [a.dest for a in _options(build_parser())]
    assert len(names) >= 226
    missing = [n for n in names if not DESCRIPTIONS.get(n, "").strip()]
    assert missing == [], f"options without a description in trainer/cli_help.py: {missing}"
    assert sorted(set(DESCRIPTIONS) - set(names)) == [], "descriptions of options the parser does not have"


def test_each_help_has_its_description_its_choices_and_one_default_at_most():
    for action in _options(describe_options(build_parser())):
        text = action.help.replace("%%", "%")
        assert text.startswith(DESCRIPTIONS[action.dest]), action.dest
        assert text.count("(default:") <= 1, (action.dest, text)
        for choice in list(action.choices or ()) + list(VALUE_CHOICES.get(action.dest, ())):
            if choice is not None:
                assert str(choice) in text, (action.dest, choice)


def test_help_text_parts():
    assert help_text("loss_type", "l2") == ("loss function between prediction and target; one of: l1, l2, huber, "
                                            "smooth_l1 (default: l2)")
    assert help_text("device", None) == "cuda, cuda:1, cpu ... (default: cuda when available, else cpu)"
    assert help_text("clip_l", required=True).endswith("(required)")
    assert help_text("v2", False, "[accepted, no effect: x]") == "Stable Diffusion 2 models (not FLUX) [accepted, " \
                                                                 "no effect: x]"


@pytest.mark.parametrize("option, words", [("metadata_title", "modelspec.title"), ("device", "cuda when available"),
                                           ("mixed_precision", "one of: no, fp16, bf16"),
                                           ("ip_noise_gamma", "input perturbation")])
def test_the_command_lines_help_shows_them(capsys, option, words):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    entry = out[out.rindex(f"--{option} {option.upper()} "):][:400]  # its entry, after the usage lines
    assert words in entry, entry
    assert "(default: None)" not in out and "(default: cuda if available) (default:" not in out


def test_the_help_module_needs_no_torch():
    code = "import sys, trainer.cli_help; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], timeout=120).returncode == 0

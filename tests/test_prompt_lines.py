"""Sample prompt files read as sd-scripts reads them (library/train_util.py: load_prompts, line_to_prompt_dict): every
flag it knows, case-insensitive, in its order; what FLUX previews ignore (or sd-scripts drops silently) becomes one
warning per prompt instead of an error; .toml and .json in sd-scripts' layouts. Each test failed before issue #13."""

import json
import re

import pytest

from trainer.sampling import PromptFileError, SamplePrompt, parse_prompt_line, read_prompts


def test_unknown_flags_are_ignored_with_one_warning_not_an_error():
    p = parse_prompt_line("a cat --nl 5 --am 1.5 --w 640", 0)
    assert p == SamplePrompt("a cat", width=640)
    assert p.warning.count("sample prompt 1") == 1
    assert "--nl 5, --am 1.5" in p.warning and "not part of the prompt" in p.warning


def test_flags_are_case_insensitive():
    p = parse_prompt_line("a dog --W 640 --H 480 --D 7 --S 12 --L 2.5 --G 4 --N blurry", 1)
    assert p == SamplePrompt("a dog", "blurry", 640, 480, 12, 4.0, 2.5, 7, 1)
    assert p.warning is None


@pytest.mark.parametrize("flag, value, why", [("ss", "euler_a", "Euler"), ("cn", "edges.png", "ControlNet"),
                                              ("ctr", "0.25", "Lumina"), ("rcfg", "1.0", "Lumina"),
                                              ("fs", "3.0", "flow shift"), ("SS", "ddim", "Euler")])
def test_sd_scripts_multi_letter_flags_are_read_and_ignored_with_the_reason(flag, value, why):
    p = parse_prompt_line(f"a tree --{flag} {value} --s 8")
    assert p == SamplePrompt("a tree", steps=8)  # not --s, not part of the prompt
    assert f"--{flag} {value}" in p.warning and why in p.warning


def test_everything_after_space_dash_dash_is_a_flag():
    p = parse_prompt_line("a cat -- sitting --w 768")
    assert p.prompt == "a cat" and p.width == 768 and "-- sitting" in p.warning
    starts = parse_prompt_line("--w 640 a cat")  # no space before: sd-scripts keeps it all as the prompt
    assert starts.prompt == "--w 640 a cat" and starts.width == 512 and "starts with '--'" in starts.warning


def test_steps_are_held_to_1_to_1000():
    assert parse_prompt_line("x --s 0").steps == 1
    p = parse_prompt_line("x --s 5000")
    assert p.steps == 1000 and "1000 used" in p.warning


def test_values_are_read_by_prefix_and_bad_values_are_ignored():
    p = parse_prompt_line("x --w 512px --l 1.5x --h tall --g -1 --d 12.7")
    assert (p.width, p.scale, p.height, p.guidance, p.seed) == (512, 1.5, 512, 3.5, 12)
    for text in ("--w 512px", "--h tall", "--g -1", "--d 12.7"):
        assert text in p.warning
    assert "--l 1.2.3: not a number" in parse_prompt_line("x --l 1.2.3").warning


def test_negative_prompt_needs_a_cfg_scale():
    assert "negative prompt is ignored" in parse_prompt_line("x --n ugly").warning
    assert parse_prompt_line("x --n ugly --l 3").warning is None
    assert parse_prompt_line("x --l 3").negative_prompt == ""  # CFG against the empty prompt, as sd-scripts


def test_txt_comments_only_at_column_one_and_warnings_name_file_and_line(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\n\nfirst --s 4\n  # indented: a prompt in sd-scripts\nthird --xx 1\n")
    warnings = []
    prompts = read_prompts(tmp_path / "p.txt", warn=warnings.append)
    assert [p.prompt for p in prompts] == ["first", "# indented: a prompt in sd-scripts", "third"]
    assert [p.index for p in prompts] == [0, 1, 2]
    assert warnings == [prompts[2].warning] and warnings[0].startswith("sample prompt 3 (p.txt line 5): --xx 1")


def test_toml_in_sd_scripts_layout(tmp_path):
    (tmp_path / "p.toml").write_text(
        '[prompt]\nwidth = 768\nsample_steps = 12\nscale = 2\nnegative_prompt = "low quality"\n'
        '[[prompt.subset]]\nprompt = "a red fox"\nseed = 3\n'
        '[[prompt.subset]]\nprompt = "a blue bird"\nwidth = 512\nguidance_scale = 1.5\nsample_sampler = "euler"\n')
    fox, bird = read_prompts(tmp_path / "p.toml")
    assert fox == SamplePrompt("a red fox", "low quality", 768, 512, 12, 3.5, 2.0, 3, 0)
    assert bird == SamplePrompt("a blue bird", "low quality", 512, 512, 12, 1.5, 2.0, None, 1)
    assert fox.warning is None and "sample_sampler" in bird.warning
    (tmp_path / "bad.toml").write_text('[prompt]\nprompt = "no subsets"\n')
    with pytest.raises(PromptFileError, match=r"bad.toml.*\[\[prompt.subset\]\]"):
        read_prompts(tmp_path / "bad.toml")


def test_json_lines_and_objects(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["a cat --W 256 --ss euler", {"prompt": "a dog", "sample_steps": 6, "seed": None,
                                                              "controlnet_image": "c.png", "steps": 9}]))
    cat, dog = read_prompts(path)
    assert cat == SamplePrompt("a cat", width=256) and "--ss euler" in cat.warning
    assert dog == SamplePrompt("a dog", steps=6, index=1)
    assert "controlnet_image" in dog.warning and "steps: not a prompt key" in dog.warning
    for bad, match in (({"prompt": "x", "seed": 1.5}, "prompt 1: seed 1.5 is not a whole number"),
                       ({"prompt": "x", "sample_steps": 0}, "sample_steps 0"), (7, "prompt 1: expected a prompt line")):
        path.write_text(json.dumps([bad]))
        with pytest.raises(PromptFileError, match=match):
            read_prompts(path)
    path.write_text(json.dumps([{"Prompt": "x"}]))
    warning = read_prompts(path)[0].warning
    assert "Prompt: not a prompt key" in warning and "the empty prompt" in warning
    path.write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(PromptFileError, match="JSON list"):
        read_prompts(path)


# ------------------------------------------------------------------------------------------ sizes a preview can take

@pytest.mark.parametrize("line, flag, limit", [
    ("a cat --w 100000 --h 100000", "--w (width) 100000", "at most 4096 px a side"),
    ("a cat --w 512 --h 4097", "--h (height) 4097", "at most 4096 px a side"),
    ("a cat --w 4096 --h 4096", "--w (width) 4096", "4096x4096 is more than the 4 MP a preview may have"),
    ("a cat --d 18446744073709551616", "--d (seed) 18446744073709551616",
     "a whole number from -9223372036854775808 to 18446744073709551615"),
    ("a cat --g " + "9" * 400, "--g (guidance) inf", "expected a finite number"),
    ("a cat --l " + "9" * 400, "--l (scale) inf", "expected a finite number"),
])
def test_preview_sizes_and_numbers_past_the_limits_are_refused_with_the_limit(tmp_path, line, flag, limit):
    (tmp_path / "p.txt").write_text(f"fine --w 1024 --h 1024\n{line}\n")
    with pytest.raises(PromptFileError) as raised:
        read_prompts(tmp_path / "p.txt")
    assert str(raised.value).startswith(f"sample prompt 2 (p.txt line 2): {flag}: ") and limit in str(raised.value)


@pytest.mark.parametrize("line, size", [("a --w 4096 --h 1024", (4096, 1024)), ("a --w 2048 --h 2048", (2048, 2048)),
                                        ("a --w 100 --h 4096", (100, 4096))])
def test_preview_sizes_within_the_limits_are_kept(line, size):
    prompt = parse_prompt_line(line)
    assert (prompt.width, prompt.height) == size and prompt.warning is None
    assert parse_prompt_line("a --d 18446744073709551615").seed == 2**64 - 1


@pytest.mark.parametrize("entry, message", [
    ({"prompt": "x", "width": 10**12}, "--w (width) 1000000000000: previews are at most 4096 px a side"),
    ({"prompt": "x", "sample_steps": 10**9}, "--s (steps) 1000000000: at most 1000 steps"),
    ({"prompt": "x", "seed": -(2**64)}, "--d (seed) -18446744073709551616: expected a whole number"),
])
def test_preview_limits_apply_to_json_prompt_files(tmp_path, entry, message):
    (tmp_path / "p.json").write_text(json.dumps([entry]))
    with pytest.raises(PromptFileError, match=re.escape(f"sample prompt 1 (p.json prompt 1): {message}")):
        read_prompts(tmp_path / "p.json")


def test_preview_limits_apply_to_toml_infinity(tmp_path):
    (tmp_path / "p.toml").write_text('[prompt]\n[[prompt.subset]]\nprompt = "x"\nguidance_scale = inf\n')
    with pytest.raises(PromptFileError, match=r"--g \(guidance\) inf: expected a finite number"):
        read_prompts(tmp_path / "p.toml")


def test_a_prompt_built_in_code_gets_the_same_limits():
    with pytest.raises(PromptFileError, match=r"^sample prompt 1: --w \(width\) 100000: previews are at most 4096"):
        SamplePrompt("x", width=100000, height=100000)


def test_prompt_lines_given_as_text_read_as_the_same_lines_in_a_file(tmp_path):
    from trainer.config.sections import PreviewConfig
    from trainer.errors import ConfigError
    from trainer.sampling import preview_prompts

    lines = ("# a comment", "a red fox --w 512 --h 320 --d 9", "", "a blue bird --s 8 --xx 3")
    path = tmp_path / "p.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    from_file, from_lines = [], []
    expected = preview_prompts(PreviewConfig(sample_prompts=str(path)), warn=from_file.append)
    assert preview_prompts(PreviewConfig(sample_prompt_lines=lines), warn=from_lines.append) == expected
    assert [p.prompt for p in expected] == ["a red fox", "a blue bird"]
    assert (expected[0].width, expected[0].height, expected[0].seed, expected[1].steps) == (512, 320, 9, 8)
    assert len(from_file) == len(from_lines) == 1 and "--xx 3" in from_lines[0]  # the same one warning
    assert preview_prompts(PreviewConfig()) == [] and not PreviewConfig().given
    with pytest.raises(ConfigError, match="sample_prompts: give a prompt file or prompt lines, not both"):
        PreviewConfig(sample_prompts=str(path), sample_prompt_lines=lines)

"""nodes/paths.py: names from a shared workflow cannot leave our folders, input folders stay under ComfyUI's input
directory, LoRA copies never replace a file, state folders are listed and resolved inside our output folder."""

import os

import pytest
from packimport import PACK, REPO, pack  # noqa: F401

paths = pack("nodes.paths")
ConfigError = pack("trainer.errors").ConfigError


@pytest.mark.parametrize("name", ["my_lora", "sks-dog.v2", "Ünïcode name", "a" * 100, "flux lora 1"])
def test_safe_names_pass_unchanged(name):
    assert paths.safe_name(name) == name


@pytest.mark.parametrize("name, why", [
    ("", "required"), ("   ", "required"), ("../evil", "/"), ("..", "'..'"), ("a/b", "/"), ("a\\b", "\\"),
    ("/etc/passwd", "/"), ("C:\\x", ":"), ("C:x", ":"), ("x\x00y", "control"), ("x\ny", "control"),
    ("CON", "reserved"), ("nul.safetensors", "reserved"), ("com1", "reserved"), ("LPT9.txt", "reserved"),
    (".hidden", "start with '.'"), ("trailing.", "trailing"), (" lead", "leading"), ("a" * 101, "longer"),
    ("what?", "?"), ("a|b", "|"), ("a*b", "*"),
])
def test_hostile_names_are_refused_with_the_reason(name, why):
    with pytest.raises(ConfigError, match="output_name") as e:
        paths.safe_name(name)
    assert why in str(e.value)


def test_run_folder_stays_in_our_output_folder_and_cache_is_reserved(tmp_path):
    assert paths.run_folder(tmp_path, "my_lora") == tmp_path / "flux_lora_trainer" / "my_lora"
    assert paths.cache_folder(tmp_path) == tmp_path / "flux_lora_trainer" / "cache"
    with pytest.raises(ConfigError, match="reserved"):
        paths.run_folder(tmp_path, "Cache")
    with pytest.raises(ConfigError):
        paths.run_folder(tmp_path, "../../escape")


def test_relative_image_folders_resolve_under_input_and_cannot_escape(tmp_path):
    inputs, outside = tmp_path / "input", tmp_path / "outside"
    (inputs / "set" / "sub").mkdir(parents=True)
    outside.mkdir()
    assert paths.resolve_input_folder("set", inputs) == inputs / "set"
    assert paths.resolve_input_folder("set/sub", inputs) == inputs / "set" / "sub"
    assert paths.resolve_input_folder("set\\sub", inputs) == inputs / "set" / "sub"
    for hostile in ("../outside", "set/../../outside", "..\\outside", "set/../.."):
        with pytest.raises(ConfigError, match="'..' is not allowed"):
            paths.resolve_input_folder(hostile, inputs)
    assert paths.resolve_input_folder(str(outside), inputs) == outside  # typed absolute path: allowed, read only
    with pytest.raises(ConfigError, match="not a folder"):
        paths.resolve_input_folder("missing", inputs)
    with pytest.raises(ConfigError, match="give a folder"):
        paths.resolve_input_folder("  ", inputs)


def test_copy_never_replaces_an_existing_lora(tmp_path):
    source = tmp_path / "run" / "my.safetensors"
    source.parent.mkdir()
    source.write_bytes(b"new")
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "my.safetensors").write_bytes(b"old")
    first = paths.copy_without_overwrite(source, loras, "my")
    second = paths.copy_without_overwrite(source, loras, "my")
    assert (first.name, second.name) == ("my_2.safetensors", "my_3.safetensors")
    assert (loras / "my.safetensors").read_bytes() == b"old" and first.read_bytes() == b"new"
    with pytest.raises(ConfigError):
        paths.copy_without_overwrite(source, loras, "../my")


def test_state_folders_are_listed_and_resolved_inside_our_folder(tmp_path):
    root = tmp_path / "flux_lora_trainer"
    for folder in ("a/a-state", "a/a-step00000010-state", "b/b-state", "cache/x-state", "a/notes"):
        (root / folder).mkdir(parents=True)
        if folder.endswith("-state"):
            (root / folder / "state.json").write_text("{}")
    (root / "a" / "half-state").mkdir()  # no state.json: not offered
    os.utime(root / "b" / "b-state", (1, 1))
    listed = paths.state_folders(tmp_path)
    assert set(listed) == {"a/a-state", "a/a-step00000010-state", "b/b-state"} and listed[-1] == "b/b-state"
    assert paths.resolve_state_folder("a/a-state", tmp_path) == root / "a" / "a-state"
    for hostile in ("../x", "a/../../x", "a", "/abs/x-state"):
        with pytest.raises(ConfigError):
            paths.resolve_state_folder(hostile, tmp_path)
    assert paths.state_folders(tmp_path / "nothing") == []


def test_folder_signature_follows_images_and_captions_not_caches(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    before = paths.folder_signature([tmp_path], (".txt",))
    (tmp_path / "a_1024x1024_flux.npz").write_bytes(b"cache")
    assert paths.folder_signature([tmp_path], (".txt",)) == before
    (tmp_path / "a.txt").write_text("a caption")
    assert paths.folder_signature([tmp_path], (".txt",)) != before

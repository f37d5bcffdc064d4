"""A run parses each model file's safetensors header once (trainer/models/safetensors_file.py): the pre-flight, the
memory plan and the loaders all open the transformer file, and a real header is megabytes of JSON. A file that
changes on disk is read again."""

from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.trainspace import cli_args, make_workspace
from trainer import cli
from trainer.atomic import save_safetensors
from trainer.models import safetensors_file
from trainer.models.safetensors_file import SafetensorsFile


@pytest.fixture
def parses(monkeypatch) -> Counter:
    monkeypatch.setattr(safetensors_file, "_HEADERS", {})
    counts: Counter = Counter()
    parse = SafetensorsFile._parse_header

    def counting(self, size):
        counts[self.path.resolve()] += 1
        return parse(self, size)

    monkeypatch.setattr(SafetensorsFile, "_parse_header", counting)
    return counts


def test_a_cli_run_parses_each_model_header_once(tmp_path, tokenizer_dirs, parses):
    ws = make_workspace(tmp_path / "ws")
    argv = cli_args(ws, tokenizer_dirs, tmp_path / "out") + [
        "--max_train_steps", "1", "--network_dim", "4", "--cache_latents", "--cache_text_encoder_outputs",
        "--network_train_unet_only"]
    assert cli.main(argv) == 0
    models = {name: Path(ws[name]).resolve() for name in ("flux", "ae", "clip_l", "t5xxl")}
    assert {name: parses[path] for name, path in models.items()} == {name: 1 for name in models}


def test_a_file_rewritten_in_place_is_parsed_again(tmp_path, parses):
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.zeros(2, 3)}, path)
    assert SafetensorsFile(path).shapes == {"a": (2, 3)}
    assert SafetensorsFile(path).shapes == {"a": (2, 3)}
    assert parses[path.resolve()] == 1
    save_safetensors({"a": torch.zeros(4, 5), "b": torch.zeros(1)}, path)
    assert SafetensorsFile(path).shapes == {"a": (4, 5), "b": (1,)}
    assert parses[path.resolve()] == 2


def test_a_header_is_not_shared_between_opened_files(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors({"a": torch.zeros(1)}, path, {"note": "x"})
    first, second = SafetensorsFile(path), SafetensorsFile(path)
    assert first.metadata == second.metadata == {"note": "x"}  # each opening pops __metadata__ from its own copy
    assert first.keys == second.keys == ["a"]

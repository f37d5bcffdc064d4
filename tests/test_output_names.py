"""The output folder's names are built and read by one module (trainer/output_names.py): the writer's names, the
rotation's step numbers, the pre-flight's guard and the checkpoint list all agree."""

import pytest

from trainer.output_names import (
    epoch_lora_name,
    final_lora_name,
    lora_kind,
    metrics_name,
    output_patterns,
    state_name,
    step_lora_name,
    step_of,
)


@pytest.mark.parametrize("stem", ["my_lora", "a.b+c (1)", "last"])
def test_every_name_a_run_writes_is_read_back_and_guarded(stem):
    written = {("step", 7): step_lora_name(stem, 7), ("epoch", 3): epoch_lora_name(stem, 3),
               ("final", None): final_lora_name(stem)}
    assert {lora_kind(name, stem): name for name in written.values()} == written
    assert step_of(step_lora_name(stem, 7), stem, ".safetensors") == 7
    assert step_of(state_name(step_lora_name(stem, 12)), stem, "-state") == 12
    names = [*written.values(), *map(state_name, written.values()), metrics_name(stem),
             state_name(final_lora_name(stem)) + ".old", state_name(step_lora_name(stem, 7)) + ".partial"]
    patterns = output_patterns(stem)
    assert all(any(p.fullmatch(name) for p in patterns) for name in names)


@pytest.mark.parametrize("name", ["my_lora2.safetensors", "my_lora-step0000007.safetensors",
                                  "my_lora-00003.safetensors", "my_lora-step١٢٣٤٥٦٧٨.safetensors",
                                  "other.safetensors", "my_lora.ckpt", "my_lora-state.zip"])
def test_names_of_another_run_or_shape_are_not_ours(name):
    assert lora_kind(name, "my_lora") is None
    assert step_of(name, "my_lora", ".safetensors") is None
    assert not any(p.fullmatch(name) for p in output_patterns("my_lora"))


def test_the_stem_is_taken_literally():
    assert lora_kind("myXlora.safetensors", "my.lora") is None
    assert lora_kind("my.lora-000002.safetensors", "my.lora") == ("epoch", 2)

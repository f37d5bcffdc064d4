"""nodes/checkpoint_list.py and nodes/grid_image.py: the LoRAs a run saved, listed from its run folder by their
metadata (a resumed run's earlier saves included, other names' and other runs' files left out), the strengths and
labels of the checkpoint sweep, and the labelled grid's layout."""

import json

import numpy as np
import pytest
import torch
from packimport import pack
from PIL import Image
from safetensors.torch import save_file

from trainer.events import SilentReporter
from trainer.loop import train

from trainspace import config, make_workspace

listing = pack("nodes.checkpoint_list")
grid = pack("nodes.grid_image")
ConfigError = pack("trainer.errors").ConfigError
NAME = "test_lora"  # trainspace's output name


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def lora_file(path, steps=None, epoch=None, output_name=NAME, started="1000.0"):
    """A LoRA-shaped safetensors file with the training metadata the loop writes (only what the listing reads)."""
    meta = {"ss_output_name": output_name, "ss_training_started_at": started}
    if steps is not None:
        meta["ss_steps"] = str(steps)
    if epoch is not None:
        meta["ss_epoch"] = str(epoch)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(path), metadata=meta)
    return path


def steps_of(checkpoints):
    return [(c.step, c.kind) for c in checkpoints]


# ------------------------------------------------------------------------------------ real runs of the trainer

def test_a_resumed_run_lists_every_save_of_the_whole_run(ws, tokenizer_dirs, tmp_path):
    run = tmp_path / NAME
    train(config(ws, tokenizer_dirs, run, max_train_steps=4, save_every_n_steps=2, save_state=True),
          SilentReporter())
    state = run / f"{NAME}-step00000004-state"
    resumed = listing.resumed_step_in(run, state)  # read before the resumed run rewrites the run folder
    assert resumed == 4
    finished = train(config(ws, tokenizer_dirs, run, max_train_steps=8, save_every_n_steps=2, save_state=True,
                            resume=str(state)), SilentReporter())
    found = listing.list_checkpoints(run, NAME, final=finished.lora, resumed_step=resumed)
    assert steps_of(found) == [(2, "step"), (4, "step"), (6, "step"), (8, "final")]
    assert [c.label for c in found] == ["step 2", "step 4", "step 6", "step 8 (final)"]
    assert found[-1].path == str(finished.lora.resolve()) and all(c.epoch >= 1 for c in found)
    # without the resume, only the second part's saves are this run's
    assert steps_of(listing.list_checkpoints(run, NAME, final=finished.lora)) == [(6, "step"), (8, "final")]


def test_epoch_saves_are_listed_with_the_step_their_metadata_records(ws, tokenizer_dirs, tmp_path):
    finished = train(config(ws, tokenizer_dirs, tmp_path, max_train_epochs=3,
                            save_every_n_epochs=1), SilentReporter())
    found = listing.list_checkpoints(tmp_path, NAME, final=finished.lora)
    batches = finished.steps // 3  # steps per epoch
    assert [(c.step, c.epoch, c.kind) for c in found] == [(batches, 1, "epoch"), (2 * batches, 2, "epoch"),
                                                          (3 * batches, 3, "final")]
    assert found[0].label == f"epoch 1 (step {batches})"


# ------------------------------------------------------------------------------------ what belongs to the run

def test_other_names_other_runs_and_unreadable_files_are_left_out(tmp_path):
    lora_file(tmp_path / f"{NAME}-step00000002.safetensors", steps=2)
    lora_file(tmp_path / f"{NAME}-000001.safetensors", steps=3, epoch=1)
    final = lora_file(tmp_path / f"{NAME}.safetensors", steps=8, epoch=2)
    lora_file(tmp_path / f"{NAME}_v2-step00000002.safetensors", steps=2)  # another output name
    lora_file(tmp_path / "other-step00000001.safetensors", steps=1, output_name="other")
    lora_file(tmp_path / f"{NAME}-step00000006.safetensors", steps=6, output_name="someone_else")  # metadata says
    lora_file(tmp_path / f"{NAME}-step00000001.safetensors", steps=1, started="999.0")  # an earlier, other run
    lora_file(tmp_path / f"{NAME}-step00000010.safetensors", steps=10)  # after the final: a later, other run
    (tmp_path / f"{NAME}-step00000005.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / f"{NAME}-step00000004-state").mkdir()
    found = listing.list_checkpoints(tmp_path, NAME, final=final)
    assert steps_of(found) == [(2, "step"), (3, "epoch"), (8, "final")]


def test_the_metadata_step_wins_over_the_name(tmp_path):
    lora_file(tmp_path / f"{NAME}-step00000003.safetensors", steps=2)
    final = lora_file(tmp_path / f"{NAME}.safetensors", steps=5)
    assert steps_of(listing.list_checkpoints(tmp_path, NAME, final=final)) == [(2, "step"), (5, "final")]


def test_a_step_saved_twice_is_listed_once_as_the_final(tmp_path):
    lora_file(tmp_path / f"{NAME}-step00000004.safetensors", steps=4)
    final = lora_file(tmp_path / f"{NAME}.safetensors", steps=4)
    assert steps_of(listing.list_checkpoints(tmp_path, NAME, final=final)) == [(4, "final")]


def test_earlier_parts_count_only_up_to_the_resumed_step(tmp_path):
    lora_file(tmp_path / f"{NAME}-step00000002.safetensors", steps=2, started="1.0")
    lora_file(tmp_path / f"{NAME}-step00000004.safetensors", steps=4, started="2.0")  # resumed at 4, part 2
    lora_file(tmp_path / f"{NAME}-step00000006.safetensors", steps=6, started="1.0")  # part 1 went on: not ours
    lora_file(tmp_path / f"{NAME}-step00000008.safetensors", steps=8, started="3.0")
    final = lora_file(tmp_path / f"{NAME}.safetensors", steps=10, started="3.0")
    found = listing.list_checkpoints(tmp_path, NAME, final=final, resumed_step=4)
    assert steps_of(found) == [(2, "step"), (4, "step"), (8, "step"), (10, "final")]


def test_no_metadata_lists_step_saves_by_name_and_takes_the_final_step_given(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / f"{NAME}-step00000002.safetensors"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / f"{NAME}.safetensors"))
    found = listing.list_checkpoints(tmp_path, NAME, final_step=3)
    assert steps_of(found) == [(2, "step"), (3, "final")]


def test_a_final_lora_that_is_not_the_runs_is_refused(tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    lora_file(other / f"{NAME}.safetensors", steps=1)
    with pytest.raises(ConfigError, match="checkpoints: .*final LoRA"):
        listing.list_checkpoints(tmp_path, NAME, final=other / f"{NAME}.safetensors")
    with pytest.raises(ConfigError, match="checkpoints"):
        listing.list_checkpoints(tmp_path, NAME)  # no final LoRA at all


def test_a_state_in_another_folder_is_no_earlier_part(tmp_path):
    state = tmp_path / "other_run" / f"{NAME}-step00000004-state"
    state.mkdir(parents=True)
    (state / "train_state.json").write_text(json.dumps({"current_epoch": 1, "current_step": 4}))
    assert listing.resumed_step_in(tmp_path / "other_run", state) == 4
    assert listing.resumed_step_in(tmp_path / NAME, state) is None
    assert listing.resumed_step_in(tmp_path / NAME, None) is None


# ------------------------------------------------------------------------------------ strengths and labels

def test_strengths_parse_and_bad_ones_name_the_option():
    assert listing.parse_strengths("0.5, 1.0") == (0.5, 1.0)
    assert listing.parse_strengths(" 1 ; -0.25 2") == (1.0, -0.25, 2.0)
    assert listing.parse_strengths("") == (1.0,)
    for bad in ("0.5, strong", "nan", "1e9"):
        with pytest.raises(ConfigError, match="strengths: "):
            listing.parse_strengths(bad)


def test_labels_pair_each_checkpoint_with_each_strength_checkpoint_major():
    cps = [listing.Checkpoint("step 2", 2, 1, "/a", "step"), listing.Checkpoint("step 4 (final)", 4, 1, "/b", "final")]
    assert listing.cell_labels(cps, (0.5, 1.0)) == ["step 2, strength 0.5", "step 2, strength 1",
                                                     "step 4 (final), strength 0.5", "step 4 (final), strength 1"]


# ------------------------------------------------------------------------------------ the grid

@pytest.mark.parametrize("count, columns, shape", [(1, 0, (1, 1)), (4, 0, (2, 2)), (5, 0, (2, 3)), (6, 2, (3, 2)),
                                                   (3, 5, (1, 3))])
def test_grid_shape(count, columns, shape):
    assert grid.grid_shape(count, columns) == shape


def test_grid_shape_refuses_nothing_and_negative_columns():
    with pytest.raises(ConfigError, match="no images"):
        grid.grid_shape(0)
    with pytest.raises(ConfigError, match="columns: -1"):
        grid.grid_shape(2, -1)


def test_the_grid_holds_each_image_under_its_label():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    images = [Image.new("RGB", (32, 24), c) for c in colours]
    labels = ["step 2, strength 0.5", "step 2, strength 1", "step 4, strength 0.5", "step 4, strength 1"]
    out = grid.label_grid(images, labels, columns=2)
    pixels = np.asarray(out)
    cell = ((out.width - 3 * grid.PAD) // 2, (out.height - 3 * grid.PAD) // 2)  # two by two cells
    strip = cell[1] - 24  # the label strip above each image
    assert out.size == (3 * grid.PAD + 2 * cell[0], 3 * grid.PAD + 2 * cell[1]) and strip > 8
    for i, colour in enumerate(colours):
        x, y = grid.cell_origin(i, 2, cell)
        left = x + (cell[0] - 32) // 2
        assert (pixels[y + strip:y + strip + 24, left:left + 32] == colour).all(), i
        text = pixels[y:y + strip, x:x + cell[0]]
        assert (text < 128).all(axis=2).any(), f"no label drawn in cell {i}"
    blank = grid.label_grid(images, [""] * 4, columns=2)
    assert not (np.asarray(blank)[:grid.PAD + strip] < 128).all(axis=2).any()


def test_the_grid_fits_mixed_sizes_and_long_labels():
    images = [Image.new("RGB", (16, 16), (10, 10, 10)), Image.new("RGB", (40, 8), (200, 0, 0))]
    out = grid.label_grid(images, ["step 100000 (final), strength 0.75", "x"], columns=0)
    assert out.width > 2 * 40 and out.height > 16

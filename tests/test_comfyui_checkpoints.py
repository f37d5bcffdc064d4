"""Every checkpoint compared in the graph, in a real ComfyUI (the `comfyui` fixture): the example workflow
flux_lora_checkpoint_grid trains on the tiny models with save_every_n_steps, LoRA Checkpoints applies each saved
LoRA at each strength, one stock KSampler renders them all and Label Grid saves one labelled grid; a re-queue
runs nothing again; a resumed run's grid covers the whole run.

Reuses the helpers of test_comfyui_workflows.py (the tiny settings, the workflow checks)."""

import copy
from pathlib import Path

import numpy as np
import pytest
import test_comfyui_workflows as wf
from packimport import pack
from PIL import Image

NAME = "flux_lora_checkpoint_grid"
CHECKPOINTS, GRID = "FluxLoraTrainerCheckpoints", "FluxLoraTrainerLabelGrid"
grid_image = pack("nodes.grid_image")


@pytest.fixture(scope="module")
def dataset(comfyui) -> str:
    from trainer.demo import write_dataset

    name = "flux_lora_checkpoints_dataset"
    folder = comfyui.base_dir / "input" / name
    if not folder.is_dir():
        write_dataset(folder)
    return name


def cells(path: Path, columns: int, count: int, size: int = 32) -> list[np.ndarray]:
    """The `count` images of a label grid of `size`-pixel images in `columns` columns (below each label strip)."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    rows = -(-count // columns)
    cell = ((pixels.shape[1] - (columns + 1) * grid_image.PAD) // columns,
            (pixels.shape[0] - (rows + 1) * grid_image.PAD) // rows)
    assert pixels.shape[:2] == ((rows + 1) * grid_image.PAD + rows * cell[1],
                                (columns + 1) * grid_image.PAD + columns * cell[0])
    strip = cell[1] - size
    out = []
    for i in range(count):
        x, y = grid_image.cell_origin(i, columns, cell)
        left = x + (cell[0] - size) // 2
        out.append(pixels[y + strip:y + strip + size, left:left + size])
    return out


def saved_grid(comfyui, prompt: dict, prompt_id: str) -> Path:
    outputs = comfyui.history(prompt_id)["outputs"]
    saved = outputs[wf.one(prompt, "SaveImage")]["images"]
    assert len(saved) == 1  # one grid, not one image per checkpoint
    return comfyui.base_dir / "output" / saved[0]["subfolder"] / saved[0]["filename"]


def test_the_example_matches_the_node_definitions(comfyui):
    info = comfyui.object_info()
    workflow = wf.load(NAME)
    wf._check_against_definitions(workflow, info)
    prompt = comfyui.prompt_from_ui(workflow, tiny_models=True)
    train, checkpoints, grid = wf.one(prompt, wf.TRAIN), wf.one(prompt, CHECKPOINTS), wf.one(prompt, GRID)
    assert prompt[train]["inputs"]["save_every_n_steps"] > 0
    assert prompt[checkpoints]["inputs"]["checkpoints"] == [train, 4]
    assert prompt[checkpoints]["inputs"]["strengths"] == "0.5, 1.0" and prompt[grid]["inputs"]["columns"] == 2
    sampler = prompt[wf.one(prompt, "KSampler")]["inputs"]
    assert sampler["model"] == [checkpoints, 0] and prompt[grid]["inputs"]["labels"] == [checkpoints, 2]
    assert prompt[wf.one(prompt, "SaveImage")]["inputs"]["images"] == [grid, 0]
    assert info[CHECKPOINTS]["output_is_list"] == [True, True, True]


def test_every_checkpoint_and_strength_is_one_labelled_cell_cached_and_resumed(comfyui, dataset):
    name = wf.unique("wf_checkpoints")
    prompt = wf.tiny(comfyui.prompt_from_ui(wf.load(NAME), tiny_models=True), dataset, name, steps=4,
                     save_every_n_steps=2, save_state=True)
    prompt[wf.one(prompt, "PrimitiveInt")]["inputs"]["value"] = next(wf._seeds)
    prompt[wf.one(prompt, "SaveImage")]["inputs"]["filename_prefix"] = f"{name}/grid"
    train, checkpoints, grid = wf.one(prompt, wf.TRAIN), wf.one(prompt, CHECKPOINTS), wf.one(prompt, GRID)

    events = comfyui.run(prompt, timeout=180)
    prompt_id = events[0]["data"]["prompt_id"]
    labels = comfyui.history(prompt_id)["outputs"][checkpoints]["text"][0].splitlines()
    assert labels == ["step 2, strength 0.5", "step 2, strength 1", "step 4 (final), strength 0.5",
                      "step 4 (final), strength 1"]
    images = cells(saved_grid(comfyui, prompt, prompt_id), columns=2, count=4)
    assert np.abs(images[0] - images[2]).mean() > 0, "steps 2 and 4 rendered the same image at strength 0.5"
    assert np.abs(images[1] - images[3]).mean() > 0, "steps 2 and 4 rendered the same image at strength 1"
    assert np.abs(images[2] - images[3]).mean() > 0, "strengths 0.5 and 1 rendered the same image"

    again = comfyui.run(prompt, timeout=60)  # the same graph: nothing trains, applies, samples or draws again
    assert wf.of(again, wf.STEP) == []
    cached = wf.of(again, "execution_cached")[0]["data"]["nodes"]
    assert {train, checkpoints, wf.one(prompt, "KSampler"), grid} <= set(cached)

    resumed = copy.deepcopy(prompt)  # go on from the step-4 state to step 6: the grid covers steps 2, 4 and 6
    resumed[train]["inputs"].update(resume=f"{name}/{name}-step00000004-state", max_train_steps=6)
    events = comfyui.run(resumed, timeout=180)
    assert [e["data"]["step"] for e in wf.of(events, wf.STEP, train)] == [5, 6]
    prompt_id = events[0]["data"]["prompt_id"]
    labels = comfyui.history(prompt_id)["outputs"][checkpoints]["text"][0].splitlines()
    assert [label.split(",")[0] for label in labels[::2]] == ["step 2", "step 4", "step 6 (final)"]
    assert len(cells(saved_grid(comfyui, resumed, prompt_id), columns=2, count=6)) == 6

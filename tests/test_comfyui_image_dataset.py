"""Datasets built in the graph, in a real ComfyUI (the `comfyui` fixture of tests/comfyui_server.py, tiny models):
the example workflow example_workflows/flux_lora_images_train_then_test.json (stock LoadImage + Batch Images + a
String (Multiline) text node feeding "Dataset from Images") trains, samples with the LoRA, writes its images only
into our cache folder, does not retrain when queued again and retrains when a caption changes; the list outputs of
stock nodes (Rebatch Images) and ComfyUI's own "Load Image Dataset from Folder" batch are accepted and chained;
a caption count that does not match is a node error naming both counts."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from test_comfyui_workflows import _check_against_definitions, _seeds, of, one, tiny, tree, unique, upstream

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "example_workflows" / "flux_lora_images_train_then_test.json"
IMAGE_SET, TRAIN, STEP = "FluxLoraTrainerImageDataset", "FluxLoraTrainerTrain", "flux_lora_trainer.step"
COLOURS = ((200, 40, 40), (40, 160, 60), (40, 60, 200))


@pytest.fixture(scope="module")
def pictures(comfyui) -> list[str]:
    """Three 64 px pictures in the server's input folder under the names the example workflow's LoadImage nodes
    hold, and a folder of two (for ComfyUI's "Load Image Dataset from Folder")."""
    names = []
    for i, colour in enumerate(COLOURS):
        image = Image.new("RGB", (64, 64), (245, 245, 245))
        ImageDraw.Draw(image).ellipse((8 + 4 * i, 10, 52, 54 - 2 * i), fill=colour)
        name = f"my_subject_{i + 1}.png"
        image.save(comfyui.base_dir / "input" / name)
        names.append(name)
    folder = comfyui.base_dir / "input" / "imgset_folder"
    folder.mkdir(exist_ok=True)
    for i, colour in enumerate(COLOURS[:2]):
        Image.new("RGB", (64, 64), colour).save(folder / f"{i}.png")
    return names


def image_sets(comfyui) -> Path:
    return comfyui.base_dir / "output" / "flux_lora_trainer" / "cache" / "image_sets"


def set_folders(comfyui) -> set[Path]:
    """The image sets written so far (the server is shared: other tests write theirs too)."""
    folder = image_sets(comfyui)
    return set(folder.iterdir()) if folder.is_dir() else set()


def widget_defaults(comfyui) -> dict:
    """The image-set node's widgets at their defaults (an API prompt names every required input)."""
    required = comfyui.object_info(IMAGE_SET)[IMAGE_SET]["input"]["required"]
    return {name: spec[1]["default"] for name, spec in required.items()
            if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}


def example_prompt(comfyui, pictures, name: str) -> dict:
    prompt = tiny(comfyui.prompt_from_ui(json.loads(WORKFLOW.read_text(encoding="utf-8")), tiny_models=True),
                  "unused", name, steps=2)
    for node_id, picture in zip(sorted((i for i, n in prompt.items() if n["class_type"] == "LoadImage"), key=int),
                                pictures):
        prompt[node_id]["inputs"]["image"] = picture
    prompt[one(prompt, IMAGE_SET)]["inputs"].update(resolution=64, num_repeats=1, min_bucket_reso=64)
    prompt[one(prompt, "PrimitiveInt")]["inputs"]["value"] = next(_seeds)
    for which in ("with", "without"):
        prompt[one(prompt, "SaveImage", f"Save ({which} LoRA)")]["inputs"]["filename_prefix"] = f"{name}/{which}"
    return prompt


def test_the_example_workflow_trains_on_images_from_the_graph_and_requeues_without_retraining(comfyui, pictures):
    workflow = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    _check_against_definitions(workflow, comfyui.object_info())
    inputs = comfyui.base_dir / "input"
    before, sets_before = tree(inputs), set_folders(comfyui)
    name = unique("wf_images")
    prompt = example_prompt(comfyui, pictures, name)
    dataset, train = one(prompt, IMAGE_SET), one(prompt, TRAIN)
    text_node = one(prompt, "PrimitiveStringMultiline")
    assert prompt[dataset]["inputs"]["captions"] == [text_node, 0]
    assert len(prompt[text_node]["inputs"]["value"].splitlines()) == 3

    events = comfyui.run(prompt, timeout=180)
    assert [e["data"]["step"] for e in of(events, STEP, train)] == [1, 2]
    outputs = comfyui.history(events[0]["data"]["prompt_id"])["outputs"]
    report = outputs[dataset]["text"][0]
    assert report.startswith("images from the graph: 3 (3 x 64x64)"), report
    assert "captions: 3 given, 0 missing" in report and "3 of 3 images have a caption file" in report
    (folder,) = set_folders(comfyui) - sets_before
    assert f"written to {folder}" in report
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == \
        ["0001.png", "0001.txt", "0002.png", "0002.txt", "0003.png", "0003.txt"]
    assert (folder / "0001.txt").read_text(encoding="utf-8") == \
        prompt[text_node]["inputs"]["value"].splitlines()[0].strip()
    with Image.open(folder / "0002.png") as written, Image.open(inputs / pictures[1]) as original:
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(original.convert("RGB")))
    assert (comfyui.base_dir / "models" / "loras" / f"{name}.safetensors").is_file()
    assert tree(inputs) == before  # nothing written into input/

    again = comfyui.run(prompt, timeout=60)  # the same graph again: nothing is written or trained
    assert of(again, STEP) == []
    assert train in of(again, "execution_cached")[0]["data"]["nodes"]
    assert set_folders(comfyui) - sets_before == {folder}

    changed = copy.deepcopy(upstream(prompt, train))  # one caption edited: a new image set, and training again
    lines = changed[text_node]["inputs"]["value"].splitlines()
    changed[text_node]["inputs"]["value"] = "\n".join([lines[0], lines[1] + ", red", lines[2]])
    events = comfyui.run(changed, timeout=180)
    assert [e["data"]["step"] for e in of(events, STEP, train)] == [1, 2]
    assert len(set_folders(comfyui) - sets_before) == 2


def test_list_outputs_and_comfyuis_folder_loader_are_accepted_and_chained(comfyui, pictures):
    listed = {
        "1": {"class_type": "LoadImage", "inputs": {"image": pictures[0]}},
        "2": {"class_type": "LoadImage", "inputs": {"image": pictures[1]}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "4": {"class_type": "RebatchImages", "inputs": {"images": ["3", 0], "batch_size": 1}},  # a list of 2
        "5": {"class_type": "LoadImageSetFromFolderNode", "inputs": {"folder": "imgset_folder",
                                                                     "resize_method": "None"}},
    }
    widgets = {**widget_defaults(comfyui), "resolution": 64, "min_bucket_reso": 64, "num_repeats": 1}
    listed["6"] = {"class_type": IMAGE_SET, "inputs": {**widgets, "images": ["4", 0], "captions": "first\nsecond"}}
    listed["7"] = {"class_type": IMAGE_SET, "inputs": {**widgets, "images": ["5", 0], "captions": "",
                                                       "datasets": ["6", 0], "class_tokens": "a plain colour"}}
    listed["8"] = {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}}
    events = comfyui.run(listed, timeout=60)
    outputs = comfyui.history(events[0]["data"]["prompt_id"])["outputs"]
    first, second = outputs["6"]["text"][0], outputs["7"]["text"][0]
    assert first.startswith("images from the graph: 2 (2 x 64x64)") and "captions: 2 given" in first
    assert second.startswith("images from the graph: 2 (2 x 64x64)") and "captions: 0 given, 2 missing" in second
    assert "dataset 1:" in second and "dataset 2:" in second  # the report covers the chain

    wrong = copy.deepcopy(listed)
    wrong["6"]["inputs"]["captions"] = "first\nsecond\nthird"
    events = comfyui.run(wrong, timeout=60, expect="execution_error")
    error = of(events, "execution_error")[0]["data"]
    assert error["node_id"] == "6" and "captions: 3 caption line(s) for 2 images" in error["exception_message"]

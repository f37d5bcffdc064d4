"""The pack in a real ComfyUI (the `comfyui` fixture of tests/comfyui_server.py): its nodes are listed, its example
workflows (example_workflows/*.json, UI format) are served by the template browser, match the node definitions and
queue; the train-then-test one trains on the tiny models and samples with and without the LoRA; Cancel saves a LoRA
and a state that a second run resumes from; re-queuing does not retrain; hostile output names write nothing.

Everything waits on websocket events (no sleeps). The stock loaders of a workflow become the tiny test loaders
(prompt_from_ui(tiny_models=True)); our models node is pointed at the same tiny files; every other node is the
shipped one.
"""

import copy
import json
import math
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_server import TINY_FILES, ComfyUIError, workflow_api

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "example_workflows"
PACK = "flux_lora_trainer"  # the folder name the server's custom_nodes/ links the checkout as
WORKFLOWS = ("flux_lora_train_then_test", "flux_lora_multi_resolution", "flux_lora_12gb", "flux_lora_sd_scripts_toml",
             "flux_lora_images_train_then_test", "flux_lora_checkpoint_grid")
OUR_NODES = ("FluxLoraTrainerModels", "FluxLoraTrainerDataset", "FluxLoraTrainerDatasetToml", "FluxLoraTrainerNetwork",
             "FluxLoraTrainerOptimizer", "FluxLoraTrainerMemory", "FluxLoraTrainerTrain", "FluxLoraTrainerApplyLora",
             "FluxLoraTrainerImageDataset", "FluxLoraTrainerCheckpoints", "FluxLoraTrainerLabelGrid")
TRAIN, DATASET, MODELS = "FluxLoraTrainerTrain", "FluxLoraTrainerDataset", "FluxLoraTrainerModels"
STEP, STATUS = "flux_lora_trainer.step", "flux_lora_trainer.status"
FRONTEND_ONLY = ("MarkdownNote", "Note")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
# combos listing model files: the workflows name the real FLUX files, which the test server does not have
FILE_COMBOS = {MODELS: ("transformer", "clip_l", "t5xxl", "ae"), "UNETLoader": ("unet_name",),
               "DualCLIPLoader": ("clip_name1", "clip_name2"), "VAELoader": ("vae_name",)}
TINY_MODELS = {"transformer": TINY_FILES["flux"][1], "clip_l": TINY_FILES["clip_l"][1],
               "t5xxl": TINY_FILES["t5xxl"][1], "ae": TINY_FILES["ae"][1]}
_seeds = iter(range(int(time.time()) % 100_000 * 100, 2**31 - 1))  # a fresh seed per queued prompt


def load(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.json").read_text(encoding="utf-8"))


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def ids_of(prompt: dict, class_type: str, title: str | None = None) -> list[str]:
    return sorted((i for i, n in prompt.items() if n["class_type"] == class_type
                   and (title is None or n["_meta"]["title"] == title)), key=int)


def one(prompt: dict, class_type: str, title: str | None = None) -> str:
    found = ids_of(prompt, class_type, title)
    assert len(found) == 1, (class_type, title, found)
    return found[0]


def upstream(prompt: dict, *roots: str) -> dict:
    """The part of an API prompt that `roots` need (them and everything linked into them)."""
    keep, todo = set(), list(roots)
    while todo:
        node = todo.pop()
        if node in keep:
            continue
        keep.add(node)
        todo += [v[0] for v in prompt[node]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return {k: v for k, v in prompt.items() if k in keep}


def tiny(prompt: dict, dataset: str, output_name: str, steps: int, lr: float = 1e-2, **train) -> dict:
    """Small numbers for every heavy widget: the tiny model files, the tiny dataset at 64 px, `steps` steps."""
    for node in prompt.values():
        inputs = node["inputs"]
        kind = node["class_type"]
        if kind == MODELS:
            inputs.update(TINY_MODELS)
        elif kind == DATASET:
            inputs.update(image_folder=dataset, num_repeats=1, resolution=64, height=0, min_bucket_reso=64)
        elif kind == "FluxLoraTrainerOptimizer":
            inputs.update(learning_rate=lr)
        elif kind == TRAIN:
            inputs.update(output_name=output_name, max_train_steps=steps, seed=next(_seeds), save_every_n_steps=0,
                          sample_prompts="", sample_every_n_steps=0)
            inputs.update(train)
        elif kind == "KSampler":
            inputs.update(steps=2)
        elif kind == "EmptySD3LatentImage":
            inputs.update(width=32, height=32)
    return prompt


def of(events: list, kind: str, node: str | None = None) -> list:
    return [e for e in events if e["type"] == kind and (node is None or (e.get("data") or {}).get("node") == node)]


def tree(folder: Path, skip: tuple = ()) -> dict:
    """{relative path: (size, mtime)} of every file under `folder`, except under the `skip` paths."""
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if Path(root, d) not in skip]
        for name in files:
            path = Path(root, name)
            if path not in skip:
                stat = path.stat()
                out[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def info(comfyui) -> dict:
    return comfyui.object_info()


@pytest.fixture(scope="module")
def dataset(comfyui) -> str:
    """The tiny captioned dataset (8 images of 64 px with .txt captions) in the server's input folder."""
    from trainer.demo import write_dataset

    name = "flux_lora_workflows_dataset"
    folder = comfyui.base_dir / "input" / name
    if not folder.is_dir():
        write_dataset(folder)
    return name


# --------------------------------------------------------------------------------------------- registration

def test_object_info_lists_every_node_of_ours_and_the_pack_imported(comfyui, info):
    assert [n for n in OUR_NODES if n not in info] == []
    assert [f for f in comfyui.import_failures() if PACK in f] == [], comfyui.log_tail()
    loaded = [ln for ln in comfyui.log_text().splitlines() if ln.rstrip().endswith(f"custom_nodes/{PACK}")]
    assert loaded and not any("IMPORT FAILED" in ln for ln in loaded), loaded
    for node in OUR_NODES:
        assert info[node]["category"] == "FLUX LoRA Trainer" and info[node]["python_module"].endswith(PACK)
        # the frontend adds a "randomize after generate" control to an INT named seed unless the flag says false:
        # on the train node it would change the seed after every queue, so the next queue would train again
        for section in ("required", "optional"):
            for name, spec in info[node]["input"].get(section, {}).items():
                if spec[0] == "INT" and name in ("seed", "noise_seed"):
                    assert spec[1].get("control_after_generate") is False, (node, name)
    # outputs are told apart by their names on the node (two IMAGE outputs: loss curve and previews)
    assert info[TRAIN]["output_name"] == ["lora", "lora_name", "loss_curve", "previews", "checkpoints"]
    assert info[TRAIN]["output"] == ["LORA_MODEL", "STRING", "IMAGE", "IMAGE", "FLUX_TRAIN_CHECKPOINTS"]
    assert info[TRAIN]["output_node"]


def test_the_template_browser_lists_and_serves_the_four_example_workflows(comfyui):
    assert sorted(p.stem for p in EXAMPLES.glob("*.json")) == sorted(WORKFLOWS)
    listed = comfyui.request("GET", "/workflow_templates")
    assert sorted(listed.get(PACK, [])) == sorted(WORKFLOWS), listed
    for name in WORKFLOWS:
        assert comfyui.request("GET", f"/api/workflow_templates/{PACK}/{name}.json") == load(name)


# ----------------------------------------------------------------------------------- the example workflows

def _check_value(where: str, value, spec: list, file_combo: bool) -> None:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        if file_combo:
            assert isinstance(value, str) and value.endswith(".safetensors"), (where, value)
        else:
            assert value in choices, (where, value, choices)
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), (where, value)
        assert options.get("min", -math.inf) <= value <= options.get("max", math.inf), (where, value)
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (where, value)
        assert options.get("min", -math.inf) <= value <= options.get("max", math.inf), (where, value)
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), (where, value)
    elif kind == "STRING":
        assert isinstance(value, str), (where, value)


def _check_against_definitions(workflow: dict, info: dict) -> None:
    """What the frontend would load without complaint: stock nodes and ours only; widgets_values holding exactly
    one value per saved widget (plus the control value after a seed-like INT), each of its widget's type, range
    and choices; links whose ends agree with the workflow's slots and the node definitions."""
    assert workflow["version"] == 0.4 and isinstance(workflow["links"][0], list)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert workflow["last_node_id"] >= max(nodes) and workflow["last_link_id"] >= max(lk[0] for lk in workflow["links"])
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY:
            assert isinstance(node["widgets_values"][0], str) and node["widgets_values"][0].strip()
            continue
        assert kind in info, kind
        module = info[kind]["python_module"]
        assert module in ("nodes",) or module.startswith("comfy_extras.") or module.endswith(PACK), (kind, module)
        where = f"node {node['id']} ({kind})"
        definition = info[kind]
        specs = workflow_api._widget_specs(definition, workflow_api.WIDGET_TYPES)
        saved = [s for s in specs if not s[2]]
        values = node.get("widgets_values") or []
        assert len(values) == sum(1 + extra for _, extra, _, _ in saved), (where, values)
        sections = {**definition["input"].get("required", {}), **definition["input"].get("optional", {})}
        i = 0
        for name, extra, _, _ in saved:
            _check_value(f"{where}.{name}", values[i], sections[name], name in FILE_COMBOS.get(kind, ()))
            spec = sections[name]
            upload = len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("image_upload")
            for control in values[i + 1:i + 1 + extra]:  # an upload combo saves its button's value, not a control
                assert control in (("image",) if upload else CONTROL_VALUES), (where, name, control)
            i += 1 + extra
    for link_id, origin, origin_slot, target, target_slot, link_type in workflow["links"]:
        source, sink = nodes[origin], nodes[target]
        assert link_id in source["outputs"][origin_slot]["links"] and sink["inputs"][target_slot]["link"] == link_id
        assert info[source["type"]]["output"][origin_slot] == link_type, (link_id, source["type"], link_type)
        name = sink["inputs"][target_slot]["name"]
        spec = {**info[sink["type"]]["input"].get("required", {}),
                **info[sink["type"]]["input"].get("optional", {})}[name]
        assert spec[0] == link_type, (link_id, sink["type"], name, spec[0], link_type)


def _train_then_test(prompt: dict) -> None:
    models = prompt[one(prompt, MODELS)]["inputs"]
    assert [models[k] for k in ("transformer", "clip_l", "t5xxl", "ae")] == \
        ["flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"]
    assert prompt[one(prompt, DATASET)]["inputs"]["image_folder"] == "my_dataset"
    assert prompt[one(prompt, "FluxLoraTrainerMemory")]["inputs"]["mode"] == "auto"
    train = one(prompt, TRAIN)
    assert "--w 1024" in prompt[train]["inputs"]["sample_prompts"]
    assert prompt[one(prompt, "FluxTrainerTestDualCLIPLoader")]["inputs"]["type"] == "flux"
    apply = prompt[one(prompt, "FluxLoraTrainerApplyLora")]["inputs"]
    unet, clip = one(prompt, "FluxTrainerTestUNETLoader"), one(prompt, "FluxTrainerTestDualCLIPLoader")
    assert (apply["model"], apply["clip"], apply["lora"]) == ([unet, 0], [clip, 0], [train, 0])
    samplers = [prompt[i]["inputs"] for i in ids_of(prompt, "KSampler")]
    assert len(samplers) == 2 and {s["model"][0] for s in samplers} == {one(prompt, "FluxLoraTrainerApplyLora"), unet}
    for s in samplers:
        assert (s["sampler_name"], s["scheduler"], s["cfg"], s["steps"]) == ("euler", "simple", 1.0, 20)
    assert samplers[0]["seed"] == samplers[1]["seed"] and samplers[0]["latent_image"] == samplers[1]["latent_image"]
    assert [prompt[i]["inputs"]["guidance"] for i in ids_of(prompt, "FluxGuidance")] == [3.5, 3.5]
    latent = prompt[one(prompt, "EmptySD3LatentImage")]["inputs"]
    assert (latent["width"], latent["height"]) == (1024, 1024)
    assert len(ids_of(prompt, "VAEDecode")) == len(ids_of(prompt, "SaveImage")) == 2
    loss = prompt[one(prompt, "PreviewImage")]["inputs"]["images"]
    assert loss == [train, 2]  # the loss curve


def _multi_resolution(prompt: dict) -> None:
    datasets = [prompt[i]["inputs"] for i in ids_of(prompt, DATASET)]
    assert [(d["resolution"], d["batch_size"]) for d in datasets] == [(512, 4), (768, 3), (1024, 2)]
    assert {d["image_folder"] for d in datasets} == {"my_dataset"}
    first, second, third = ids_of(prompt, DATASET)
    assert "datasets" not in datasets[0] and datasets[1]["datasets"] == [first, 0] and \
        datasets[2]["datasets"] == [second, 0]
    assert prompt[one(prompt, TRAIN)]["inputs"]["datasets"] == [third, 0]


def _twelve_gb(prompt: dict) -> None:
    memory = prompt[one(prompt, "FluxLoraTrainerMemory")]["inputs"]
    assert (memory["mode"], memory["gradient_checkpointing"], memory["blocks_to_swap"], memory["fp8_base"],
            memory["cpu_offload_checkpointing"]) == ("manual", True, 16, True, False)  # the guide's 12 GB row
    assert prompt[one(prompt, MODELS)]["inputs"]["t5xxl_fp8"] is True
    assert prompt[one(prompt, "FluxLoraTrainerOptimizer")]["inputs"]["optimizer_type"] == "AdamW8bit"
    assert prompt[one(prompt, MODELS)]["inputs"]["base_precision"] == "fp8_e4m3fn"


def _toml(prompt: dict) -> None:
    node = prompt[one(prompt, "FluxLoraTrainerDatasetToml")]["inputs"]
    assert node["toml_file"] == "" and "[[datasets.subsets]]" in node["toml_text"]
    assert 'image_dir = "my_dataset"' in node["toml_text"]
    assert prompt[one(prompt, TRAIN)]["inputs"]["datasets"] == [one(prompt, "FluxLoraTrainerDatasetToml"), 0]


def _images_train_then_test(prompt: dict) -> None:
    dataset = one(prompt, "FluxLoraTrainerImageDataset")
    inputs = prompt[dataset]["inputs"]
    assert inputs["captions"] == [one(prompt, "PrimitiveStringMultiline"), 0]
    assert len(ids_of(prompt, "LoadImage")) == 3 and inputs["images"] == [ids_of(prompt, "ImageBatch")[-1], 0]
    assert prompt[one(prompt, TRAIN)]["inputs"]["datasets"] == [dataset, 0]


def _checkpoint_grid(prompt: dict) -> None:
    train, checkpoints = one(prompt, TRAIN), one(prompt, "FluxLoraTrainerCheckpoints")
    assert prompt[train]["inputs"]["save_every_n_steps"] == 250
    assert prompt[checkpoints]["inputs"]["checkpoints"] == [train, 4]
    assert prompt[one(prompt, "KSampler")]["inputs"]["model"] == [checkpoints, 0]
    assert prompt[one(prompt, "SaveImage")]["inputs"]["images"] == [one(prompt, "FluxLoraTrainerLabelGrid"), 0]


CONTENT = {"flux_lora_train_then_test": _train_then_test, "flux_lora_multi_resolution": _multi_resolution,
           "flux_lora_12gb": _twelve_gb, "flux_lora_sd_scripts_toml": _toml,
           "flux_lora_images_train_then_test": _images_train_then_test, "flux_lora_checkpoint_grid": _checkpoint_grid}


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_workflow_matches_the_node_definitions_and_converts(comfyui, info, name):
    workflow = load(name)
    _check_against_definitions(workflow, info)
    prompt = comfyui.prompt_from_ui(workflow, tiny_models=True)
    assert all(n["class_type"] in info for n in prompt.values())
    graph_nodes = [n for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY and n.get("mode", 0) == 0]
    assert sorted(prompt, key=int) == sorted((str(n["id"]) for n in graph_nodes), key=int)
    assert {n["class_type"] for n in prompt.values()} >= {MODELS, TRAIN, "FluxLoraTrainerNetwork",
                                                          "FluxLoraTrainerOptimizer", "FluxLoraTrainerMemory"}
    assert any(n["type"] in FRONTEND_ONLY for n in workflow["nodes"])  # each explains itself in a note
    CONTENT[name](prompt)


# ------------------------------------------------------------------------------------ running the workflows

def test_train_then_test_trains_previews_saves_and_samples_with_and_without_the_lora(comfyui, dataset):
    folder = comfyui.base_dir / "input" / dataset
    before = tree(folder)
    name = unique("wf_train_then_test")
    prompt = tiny(comfyui.prompt_from_ui(load("flux_lora_train_then_test"), tiny_models=True), dataset, name,
                  steps=4, sample_prompts="a red circle on a white background --w 32 --h 32 --s 2",
                  sample_every_n_steps=2)
    prompt[one(prompt, "PrimitiveInt")]["inputs"]["value"] = next(_seeds)
    for which in ("with", "without"):
        prompt[one(prompt, "SaveImage", f"Save ({which} LoRA)")]["inputs"]["filename_prefix"] = f"{name}/{which}"
    train = one(prompt, TRAIN)
    events = comfyui.run(prompt, timeout=120)
    prompt_id = events[0]["data"]["prompt_id"]

    progress = [e["data"] for e in of(events, "progress", train)]
    assert {"value": 4, "max": 4} in [{"value": p["value"], "max": p["max"]} for p in progress]
    steps = [e["data"] for e in of(events, STEP, train)]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and {s["total"] for s in steps} == {4}
    assert all(s["prompt_id"] == prompt_id and math.isfinite(s["loss"]) and s["lr"] > 0 for s in steps)
    assert of(events, STATUS, train)
    previews = [e for e in events if e["type"] == "binary" and e.get("node") == train]
    assert len(previews) >= 2 and all(e["size"] > 0 for e in previews)  # samples at steps 2 and 4

    lora = comfyui.base_dir / "models" / "loras" / f"{name}.safetensors"
    assert lora.is_file()
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        assert any(k.startswith("lora_unet_") for k in f.keys())
    outputs = comfyui.history(prompt_id)["outputs"]
    assert f"LoRA: {lora.name}" in outputs[train]["text"][0] and len(outputs[train]["loss"]) == 4
    assert outputs[one(prompt, "PreviewImage")]["images"][0]["type"] == "temp"  # the loss curve
    assert "8 images" in outputs[one(prompt, DATASET)]["text"][0]  # the pre-flight report

    pixels = {}
    for which in ("with", "without"):
        saved = outputs[one(prompt, "SaveImage", f"Save ({which} LoRA)")]["images"]
        assert len(saved) == 1 and saved[0]["subfolder"] == name
        with Image.open(comfyui.base_dir / "output" / name / saved[0]["filename"]) as image:
            assert image.size == (32, 32)
            pixels[which] = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert np.abs(pixels["with"] - pixels["without"]).mean() > 0, "the LoRA changed nothing in the sampled image"
    assert tree(folder) == before  # the image folder is only read

    again = comfyui.run(prompt, timeout=60)  # the same graph again: nothing retrains
    assert of(again, STEP) == [] and of(again, "progress", train) == []
    cached = of(again, "execution_cached")
    assert len(cached) == 1 and train in cached[0]["data"]["nodes"]
    assert not (lora.parent / f"{name}_2.safetensors").exists()


def test_cancel_saves_lora_and_state_and_a_resumed_run_continues(comfyui, dataset):
    images = comfyui.base_dir / "input" / dataset
    before = tree(images)
    name = unique("wf_cancel")
    full = tiny(comfyui.prompt_from_ui(load("flux_lora_train_then_test"), tiny_models=True), dataset, name,
                steps=200)
    train = one(full, TRAIN)
    prompt = upstream(full, train)
    # disk caches (in our cache folder, not the image folder): the resumed run reads what the first one wrote
    prompt[one(prompt, "FluxLoraTrainerMemory")]["inputs"].update(mode="manual", latent_cache="disk",
                                                                    text_cache="disk")
    prompt_id = comfyui.queue(prompt)
    second = comfyui.wait_for(prompt_id, lambda e: e["type"] == STEP and e["data"]["step"] == 2, timeout=120)
    step_seconds = second["received"] - of(comfyui.events(prompt_id), STEP, train)[0]["received"]
    asked = time.monotonic()
    comfyui.interrupt(prompt_id)
    seen = of(comfyui.events(prompt_id), STEP, train)[-1]["data"]["step"]
    events = comfyui.wait(prompt_id, timeout=60)
    ends = [e for e in events if e["type"] in ("execution_success", "execution_error", "execution_interrupted")]
    assert [e["type"] for e in ends] == ["execution_interrupted"], ends
    # within seconds: the step under way, then the LoRA and the state are saved (the bound follows this machine's
    # pace, as the tests may share a busy CPU; training on would take ~200 steps)
    assert ends[0]["data"]["node_id"] == train
    assert ends[0]["received"] - asked < max(5.0, 3 * step_seconds), (ends[0]["received"] - asked, step_seconds)
    stopped = of(events, STEP, train)[-1]["data"]["step"]
    assert stopped <= seen + 2 and stopped < 200, (seen, stopped)

    run = comfyui.base_dir / "output" / PACK / name
    assert (run / f"{name}.safetensors").is_file()
    states = [p for p in run.iterdir() if p.name.endswith("-state") and (p / "state.json").is_file()]
    assert len(states) == 1
    choices = comfyui.object_info(TRAIN)[TRAIN]["input"]["required"]["resume"][1]["options"]
    assert f"{name}/{states[0].name}" in choices  # the resume combo lists it (read when the graph is loaded)

    resumed = copy.deepcopy(prompt)
    resumed[train]["inputs"].update(resume=f"{name}/{states[0].name}", max_train_steps=stopped + 2)
    events = comfyui.run(resumed, timeout=120)
    steps = [e["data"]["step"] for e in of(events, STEP, train)]
    assert steps == [stopped + 1, stopped + 2], steps
    assert (comfyui.base_dir / "models" / "loras" / f"{name}.safetensors").is_file()
    assert list((comfyui.base_dir / "output" / PACK / "cache").rglob("*.npz")) and tree(images) == before


def test_hostile_output_names_are_refused_and_write_nothing_outside(comfyui, dataset):
    base = comfyui.base_dir
    outside = base.parent / unique("evil_abs")
    ours = (base / "output" / PACK, base / "temp", base / "user", base / "comfyui.log")
    before = tree(base.parent, ours)
    full = tiny(comfyui.prompt_from_ui(load("flux_lora_train_then_test"), tiny_models=True), dataset, "x", steps=2)
    train = one(full, TRAIN)
    for hostile in ("../../evil", str(outside), "CON", "..", "a/b"):
        prompt = upstream(full, train)
        prompt[train]["inputs"].update(output_name=hostile, seed=next(_seeds))
        try:
            events = comfyui.run(prompt, timeout=60, expect="execution_error")
        except ComfyUIError as e:  # refused while validating: a node error
            assert "node errors" in str(e) and "output_name" in str(e), e
            continue
        error = of(events, "execution_error")[0]["data"]
        assert error["node_id"] == train and "output_name" in error["exception_message"], error
        assert of(events, STEP) == []
    assert tree(base.parent, ours) == before
    assert not outside.exists() and not (base.parent / "evil").exists() and not (base / "evil").exists()


@pytest.mark.parametrize("name", ["flux_lora_multi_resolution", "flux_lora_sd_scripts_toml"])
def test_dataset_workflows_show_the_preflight_report_and_train_a_step(comfyui, dataset, name):
    prompt = tiny(comfyui.prompt_from_ui(load(name), tiny_models=True), dataset, unique("wf_data"), steps=1)
    reports = ids_of(prompt, DATASET) or ids_of(prompt, "FluxLoraTrainerDatasetToml")
    if name == "flux_lora_multi_resolution":  # the guide's three resolutions, at tiny sizes
        for node, size in zip(reports, (64, 96, 128)):
            prompt[node]["inputs"].update(resolution=size, min_bucket_reso=64, max_bucket_reso=size)
        expected = [(64, 4), (96, 3), (128, 2)]  # (resolution, batch size) of datasets 1, 2, 3
    else:
        text = prompt[reports[0]]["inputs"]["toml_text"]
        text = text.replace('"my_dataset"', json.dumps(dataset)).replace("resolution = 1024", "resolution = 64")
        text = text.replace("min_bucket_reso = 256", "min_bucket_reso = 64")  # buckets refuse a smaller resolution
        prompt[reports[0]]["inputs"]["toml_text"] = text.replace("resolution = 512", "resolution = 128")
        expected = [(64, 2), (128, 4)]
    events = comfyui.run(prompt, timeout=120)
    train = one(prompt, TRAIN)
    assert [e["data"]["step"] for e in of(events, STEP, train)] == [1]
    outputs = comfyui.history(events[0]["data"]["prompt_id"])["outputs"]
    report = outputs[reports[-1]]["text"][0]  # the last dataset node reports the whole chain
    lines = [ln for ln in report.splitlines() if ln.startswith("dataset ")]
    assert len(lines) == len(expected), report
    for line, (size, batch) in zip(lines, expected):
        assert f"{size}x{size}" in line and f"batch size {batch}" in line, report
    assert "batches per epoch" in report and "8 of 8 images have a caption file" in report


def test_the_12gb_preset_settings_pass_their_nodes_checks(comfyui, dataset):
    """The preset's models, dataset, optimizer and memory nodes run (training itself needs a GPU for the fp8 base
    and bitsandbytes for AdamW8bit); each node's text says what it took."""
    prompt = tiny(comfyui.prompt_from_ui(load("flux_lora_12gb"), tiny_models=True), dataset, "x", steps=1)
    nodes = [one(prompt, k) for k in (MODELS, DATASET, "FluxLoraTrainerOptimizer", "FluxLoraTrainerMemory")]
    part = upstream(prompt, *nodes)
    for i, node in enumerate(nodes):
        part[f"90{i}"] = {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}
    events = comfyui.run(part, timeout=60)
    texts = {e["data"]["node"]: e["data"]["output"]["text"][0] for e in of(events, "executed") if
             e["data"]["node"] in nodes}
    assert "base fp8_e4m3fn" in texts[nodes[0]]
    assert "dataset 1: 64x64, batch size 1" in texts[nodes[1]]
    assert texts[nodes[2]].startswith("AdamW8bit at")
    assert "blocks to swap 16" in texts[nodes[3]] and "fp8 base on" in texts[nodes[3]]

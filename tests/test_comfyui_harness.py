"""The live-ComfyUI harness itself: the server (tests/comfyui_server.py), the tiny loaders (tests/comfyui/tiny_nodes)
and the UI->API converter (tests/comfyui/workflow_api.py). A UI-format FLUX workflow with stock nodes samples an
image on ComfyUI's own code, reports progress over the websocket and can be interrupted."""

import copy

import pytest
from PIL import Image

from comfyui_server import TINY_FILES, TINY_LOADERS, ComfyUIError, WorkflowError, ui_to_api

# the `comfyui` fixture; a plugin is registered once, so every module that names it shares one server (importing
# the fixture function instead would start one server per importing module)

FLUX, CLIP_L, T5, AE = (TINY_FILES[k][1] for k in ("flux", "clip_l", "t5xxl", "ae"))
SEED = 7


def _in(name, type_, link, widget=False):
    slot = {"name": name, "type": type_, "link": link}
    if widget:
        slot["widget"] = {"name": name}
    return slot


def _out(name, type_, links):
    return {"name": name, "type": type_, "links": links}


def _node(id_, type_, widgets=None, inputs=(), outputs=(), mode=0, title=None):
    node = {"id": id_, "type": type_, "pos": [100 * id_, 100], "size": [300, 100], "flags": {}, "order": id_,
            "mode": mode, "inputs": list(inputs), "outputs": list(outputs), "properties": {}}
    if widgets is not None:
        node["widgets_values"] = widgets
    if title:
        node["title"] = title
    return node


# What the browser saves (schema 0.4): stock loaders; a bypassed ModelSamplingFlux between UNETLoader and KSampler;
# the VAE through a Reroute; KSampler's seed fed by a PrimitiveNode (its saved 42 is stale; the primitive holds 7);
# EmptySD3LatentImage's width from a PrimitiveInt node; a muted second SaveImage; two notes.
WORKFLOW = {
    "last_node_id": 17, "last_link_id": 15, "version": 0.4, "extra": {}, "groups": [], "config": {},
    "nodes": [
        _node(1, "UNETLoader", [FLUX, "default"], outputs=[_out("MODEL", "MODEL", [1])]),
        _node(2, "DualCLIPLoader", [CLIP_L, T5, "flux", "default"], outputs=[_out("CLIP", "CLIP", [2, 3])]),
        _node(3, "VAELoader", [AE], outputs=[_out("VAE", "VAE", [4])]),
        _node(4, "CLIPTextEncode", ["a photo of a cat"], [_in("clip", "CLIP", 2)],
              [_out("CONDITIONING", "CONDITIONING", [5])], title="positive"),
        _node(5, "CLIPTextEncode", [""], [_in("clip", "CLIP", 3)], [_out("CONDITIONING", "CONDITIONING", [7])]),
        _node(6, "FluxGuidance", [3.5], [_in("conditioning", "CONDITIONING", 5)],
              [_out("CONDITIONING", "CONDITIONING", [6])]),
        _node(7, "EmptySD3LatentImage", [64, 32, 1],
              [_in("width", "INT", 13, widget=True), _in("height", "INT", None, widget=True)],
              [_out("LATENT", "LATENT", [8])]),
        _node(8, "KSampler", [42, "randomize", 3, 1.0, "euler", "simple", 1.0],
              [_in("model", "MODEL", 9), _in("positive", "CONDITIONING", 6), _in("negative", "CONDITIONING", 7),
               _in("latent_image", "LATENT", 8), _in("seed", "INT", 14, widget=True)],
              [_out("LATENT", "LATENT", [10])]),
        _node(9, "VAEDecode", None, [_in("samples", "LATENT", 10), _in("vae", "VAE", 11)],
              [_out("IMAGE", "IMAGE", [12, 15])]),
        _node(10, "SaveImage", ["harness"], [_in("images", "IMAGE", 12)]),
        _node(11, "SaveImage", ["muted"], [_in("images", "IMAGE", 15)], mode=2),
        _node(12, "Reroute", None, [_in("", "*", 4)], [_out("", "VAE", [11])]),
        _node(13, "ModelSamplingFlux", [1.15, 0.5, 1024, 1024], [_in("model", "MODEL", 1)],
              [_out("MODEL", "MODEL", [9])], mode=4),
        _node(14, "PrimitiveInt", [32, "fixed"], outputs=[_out("INT", "INT", [13])]),
        _node(15, "PrimitiveNode", [SEED, "fixed"], outputs=[{**_out("INT", "INT", [14]), "widget": {"name": "seed"}}]),
        _node(16, "Note", ["Tiny FLUX: the loaders are swapped for test ones in the tests"]),
        _node(17, "MarkdownNote", ["# notes are skipped"]),
    ],
    "links": [
        [1, 1, 0, 13, 0, "MODEL"], [2, 2, 0, 4, 0, "CLIP"], [3, 2, 0, 5, 0, "CLIP"], [4, 3, 0, 12, 0, "*"],
        [5, 4, 0, 6, 0, "CONDITIONING"], [6, 6, 0, 8, 1, "CONDITIONING"], [7, 5, 0, 8, 2, "CONDITIONING"],
        [8, 7, 0, 8, 3, "LATENT"], [9, 13, 0, 8, 0, "MODEL"], [10, 8, 0, 9, 0, "LATENT"], [11, 12, 0, 9, 1, "VAE"],
        [12, 9, 0, 10, 0, "IMAGE"], [13, 14, 0, 7, 0, "INT"], [14, 15, 0, 8, 4, "INT"], [15, 9, 0, 11, 0, "IMAGE"],
    ],
}


def tiny_prompt(comfyui, **ksampler):
    prompt = comfyui.prompt_from_ui(WORKFLOW, replace_types=TINY_LOADERS)
    prompt["8"]["inputs"].update(ksampler)
    return prompt


def test_server_lists_the_tiny_loaders_and_every_custom_node_imported(comfyui):
    info = comfyui.object_info()
    assert comfyui.import_failures() == [], comfyui.log_tail()
    log = comfyui.log_text()
    assert "custom_nodes/flux_lora_trainer" in log and "custom_nodes/flux_trainer_test_nodes" in log
    for stock, tiny in TINY_LOADERS.items():
        assert tiny in info, f"{tiny} not listed"
        for section in ("required", "optional"):  # the same widgets, so a saved workflow can be swapped over
            stock_inputs = info[stock]["input"].get(section, {})
            tiny_inputs = info[tiny]["input"].get(section, {})
            assert list(tiny_inputs) == list(stock_inputs), (stock, section)
    assert FLUX in info[TINY_LOADERS["UNETLoader"]]["input"]["required"]["unet_name"][1]["options"]


def test_ui_workflow_converts_and_samples_an_image_with_progress(comfyui):
    prompt = tiny_prompt(comfyui)
    assert sorted(prompt, key=int) == ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "14"]
    assert prompt["1"] == {"class_type": "FluxTrainerTestUNETLoader", "_meta": {"title": "UNETLoader"},
                           "inputs": {"unet_name": FLUX, "weight_dtype": "default"}}
    assert prompt["2"]["inputs"] == {"clip_name1": CLIP_L, "clip_name2": T5, "type": "flux", "device": "default"}
    ks = prompt["8"]["inputs"]
    assert ks["model"] == ["1", 0] and ks["seed"] == SEED and ks["steps"] == 3 and ks["latent_image"] == ["7", 0]
    assert ks["sampler_name"] == "euler" and ks["denoise"] == 1.0 and "control_after_generate" not in ks
    assert prompt["9"]["inputs"] == {"samples": ["8", 0], "vae": ["3", 0]}
    assert prompt["7"]["inputs"] == {"width": ["14", 0], "height": 32, "batch_size": 1}
    assert prompt["14"]["inputs"] == {"value": 32}

    events = comfyui.run(prompt, timeout=60)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "execution_start" and "execution_success" in kinds and kinds[-1] == "executing"
    progress = [e["data"] for e in events if e["type"] == "progress" and e["data"]["node"] == "8"]
    assert [p["value"] for p in progress] == [1, 2, 3] and {p["max"] for p in progress} == {3}
    previews = [e for e in events if e["type"] == "binary"]
    assert previews and all(e["event"] == 4 and e["node"] == "8" and e["size"] > 0 for e in previews)
    saved = next(e["data"]["output"]["images"] for e in events if e["type"] == "executed" and e["data"]["node"] == "10")
    assert len(saved) == 1 and saved[0]["type"] == "output"
    path = comfyui.base_dir / "output" / saved[0]["subfolder"] / saved[0]["filename"]
    with Image.open(path) as image:
        assert image.size == (32, 32)
    history = comfyui.history(events[0]["data"]["prompt_id"])
    assert history["status"]["status_str"] == "success" and "10" in history["outputs"]


def test_interrupt_after_the_first_progress_event_ends_the_run(comfyui):
    prompt_id = comfyui.queue(tiny_prompt(comfyui, steps=10000, seed=SEED + 1))
    first = comfyui.wait_for(prompt_id, lambda e: e["type"] == "progress", timeout=60)
    assert first["data"]["node"] == "8"
    comfyui.interrupt(prompt_id)
    events = comfyui.wait(prompt_id, timeout=60)
    ends = [e for e in events if e["type"] in ("execution_success", "execution_error", "execution_interrupted")]
    assert [e["type"] for e in ends] == ["execution_interrupted"], ends
    assert ends[0]["data"]["node_id"] == "8"
    steps = [e["data"]["value"] for e in events if e["type"] == "progress" and e["data"]["node"] == "8"]
    assert max(steps) < 10000
    assert comfyui.history(prompt_id)["status"]["status_str"] == "error"


def test_vae_encode_feeds_an_img2img_run(comfyui):
    prompt = tiny_prompt(comfyui, seed=SEED + 3, denoise=0.6, latent_image=["21", 0])
    gray = {"width": 32, "height": 48, "batch_size": 1, "color": 0x808080}
    prompt["20"] = {"class_type": "EmptyImage", "inputs": gray}
    prompt["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["3", 0]}}
    events = comfyui.run(prompt, timeout=60)
    assert {e["data"]["node"] for e in events if e["type"] == "executing"} >= {"21", "8", "9", "10"}
    saved = next(e["data"]["output"]["images"][0] for e in events if e["type"] == "executed")
    with Image.open(comfyui.base_dir / "output" / saved["subfolder"] / saved["filename"]) as image:
        assert image.size == (32, 48)


def test_a_flux_template_shipped_with_comfyui_runs_on_the_tiny_models(comfyui):
    """A workflow the frontend saved (the "Flux Dev full text to image" template), not one written here."""
    try:
        workflow = comfyui.template("flux_dev_full_text_to_image")
    except ComfyUIError as e:
        pytest.skip(f"this ComfyUI serves no such template: {e}")
    prompt = comfyui.prompt_from_ui(workflow, tiny_models=True)
    latent = next(n for n in prompt.values() if n["class_type"] == "EmptySD3LatentImage")
    sampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")
    assert {n["class_type"] for n in prompt.values()} >= set(TINY_LOADERS.values()) | {"CLIPTextEncodeFlux"}
    latent["inputs"].update(width=48, height=32)
    sampler["inputs"].update(steps=2, seed=SEED + 2)
    events = comfyui.run(prompt, timeout=60)
    images = [img for e in events if e["type"] == "executed" for img in e["data"]["output"].get("images", [])]
    assert len(images) == 1 and (comfyui.base_dir / "output" / images[0]["subfolder"] / images[0]["filename"]).is_file()


# --------------------------------------------------------------------------- the converter alone (no server)

INFO = {
    "Gen": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {}], "mode": [["a", "b"]],
                                   "n": ["INT", {"forceInput": True}]},
                      "optional": {"extra": ["FLOAT", {"default": 1.5}]}},
            "input_order": {"required": ["model", "seed", "mode", "n"], "optional": ["extra"]}},
    "Src": {"input": {"required": {}}, "output": ["MODEL", "INT"]},
}


def _tiny_graph(gen_widgets, src_mode=0):
    return {"nodes": [_node(1, "Src", [], outputs=[_out("MODEL", "MODEL", [1]), _out("INT", "INT", [2])],
                            mode=src_mode),
                      _node(2, "Gen", gen_widgets, [_in("model", "MODEL", 1), _in("n", "INT", 2)])],
            "links": [{"id": 1, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "MODEL"},
                      {"id": 2, "origin_id": 1, "origin_slot": 1, "target_id": 2, "target_slot": 1, "type": "INT"}]}


@pytest.mark.parametrize(("widgets", "extra"), [
    ([5, "fixed", "b", 0.5], 0.5),            # frontend >= 1.16
    ([5, "fixed", "b", 0, 0.5], 0.5),         # older: a dummy value for the forceInput input
    ([5, "fixed", "b"], 1.5),                 # saved before the optional widget existed: its default
    ([5, "fixed", "b", 0.5, "x", 3], 0.5),    # values of widgets a frontend extension added: ignored
])
def test_converter_widget_layouts(widgets, extra):
    prompt = ui_to_api(_tiny_graph(widgets), INFO)
    assert prompt["2"]["inputs"] == {"model": ["1", 0], "n": ["1", 1], "seed": 5, "mode": "b", "extra": extra}


def test_converter_drops_links_from_muted_nodes_and_refuses_what_it_cannot_map():
    prompt = ui_to_api(_tiny_graph([5, "fixed", "b", 0.5], src_mode=2), INFO)
    assert list(prompt) == ["2"] and prompt["2"]["inputs"] == {"seed": 5, "mode": "b", "extra": 0.5}
    with pytest.raises(WorkflowError, match="widgets_values is a dict"):
        ui_to_api(_tiny_graph({"seed": 5, "mode": "b"}), INFO)
    with pytest.raises(WorkflowError, match="no node type 'Gen'"):
        ui_to_api(copy.deepcopy(_tiny_graph([5, "fixed", "b"])), {"Src": INFO["Src"]})
    graph = _tiny_graph([5, "fixed", "b"])
    graph["definitions"] = {"subgraphs": [{"id": "Gen"}]}
    with pytest.raises(WorkflowError, match="subgraph"):
        ui_to_api(graph, INFO)

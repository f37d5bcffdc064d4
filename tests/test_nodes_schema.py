"""The node classes against ComfyUI's own V3 API (the snapshot in .comfyui/ComfyUI, or $COMFYUI_DIR): the
extension lists every node, schemas build and add no heavy module of ours, and the light nodes run (NodeOutput,
UI text, the core's messages as node errors). Skipped, with one line saying why, where ComfyUI is absent."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packimport import PACK, REPO, pack  # noqa: F401

COMFYUI = Path(os.environ.get("COMFYUI_DIR", REPO / ".comfyui" / "ComfyUI"))
HAVE_COMFYUI = (COMFYUI / "comfy_api" / "latest" / "__init__.py").is_file()
pytestmark = pytest.mark.skipif(not HAVE_COMFYUI, reason=f"ComfyUI not found at {COMFYUI} (set COMFYUI_DIR or run "
                                                         "bash ../shared/comfyui/setup.sh .comfyui)")
NODE_IDS = ["FluxLoraTrainerModels", "FluxLoraTrainerDataset", "FluxLoraTrainerDatasetToml",
            "FluxLoraTrainerImageDataset", "FluxLoraTrainerNetwork", "FluxLoraTrainerOptimizer",
            "FluxLoraTrainerMemory", "FluxLoraTrainerTrain", "FluxLoraTrainerApplyLora", "FluxLoraTrainerCheckpoints",
            "FluxLoraTrainerLabelGrid"]
# pack modules that building every schema may load: the nodes and the torch-free option vocabularies
TORCH_FREE = {"", ".nodes", ".nodes.common", ".nodes.paths", ".nodes.pieces", ".nodes.translate", ".trainer",
              ".trainer.config", ".trainer.errors", ".trainer.output_names",
              *(f".nodes.{n}" for n in ("models", "dataset", "network", "optimizer", "memory", "train", "apply",
                                        "checkpoints", "checkpoint_list")),
              *(f".trainer.config.{n}" for n in ("combine", "data", "extra_options", "finite", "flow", "lora",
                                                  "memory_auto", "memory_plan", "model_type", "names", "optim",
                                                  "resolve", "safe_regex", "sections", "swap_split", "train"))}

MEASURE = """
import asyncio, importlib.util, json, sys
sys.path.append(sys.argv[2])
root_only = sorted(m for m in ("torch", "comfy_api", "numpy", "PIL") if m in sys.modules)
import comfy_api.latest

api_loads_torch = "torch" in sys.modules
before = set(sys.modules)
spec = importlib.util.spec_from_file_location("pack_under_test", sys.argv[1] + "/__init__.py",
                                              submodule_search_locations=[sys.argv[1]])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
after_root = sorted(set(sys.modules) - before)
nodes = asyncio.run(asyncio.run(module.comfy_entrypoint()).get_node_list())
ids = [n.GET_SCHEMA().node_id for n in nodes]
for n in nodes:
    n.INPUT_TYPES()
added = sorted(set(sys.modules) - before)
print(json.dumps({"root": after_root, "ids": ids, "api_loads_torch": api_loads_torch,
                  "ours": [m[len("pack_under_test"):] for m in added if m.startswith("pack_under_test")],
                  "others": [m for m in added if not m.startswith("pack_under_test")],
                  "v1": hasattr(module, "NODE_CLASS_MAPPINGS"), "web": module.WEB_DIRECTORY}))
"""




@pytest.fixture(scope="module")
def comfy():
    if str(COMFYUI) not in sys.path:
        sys.path.append(str(COMFYUI))  # appended: ComfyUI's top-level names must not shadow anything of ours
    import folder_paths
    from comfy_api.latest import io

    return folder_paths, io


def test_building_every_schema_adds_no_heavy_module_of_ours():
    out = subprocess.run([sys.executable, "-c", MEASURE, str(REPO), str(COMFYUI)], capture_output=True, text=True,
                         check=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert found["ids"] == NODE_IDS
    assert found["root"] == ["pack_under_test"]  # the entry point imports nothing until ComfyUI asks for nodes
    assert set(found["ours"]) <= TORCH_FREE, set(found["ours"]) - TORCH_FREE
    heavy = {"torch", "numpy", "PIL", "safetensors", "transformers"}
    assert not heavy & {m.split(".")[0] for m in found["others"]}, found["others"]
    assert found["v1"] is False and found["web"] == "./js"


def test_schemas_use_our_prefix_types_and_the_cores_defaults(comfy):
    _, io = comfy
    nodes = pack("nodes").node_list()
    t = pack("nodes.translate")
    rec = t.recommended()
    schemas = {n.GET_SCHEMA().node_id: n.GET_SCHEMA() for n in nodes}
    assert list(schemas) == NODE_IDS
    builtin = {"TrainLoraNode", "LoraModelLoader", "SaveLoRANode", "LossGraphNode", "LoraLoader"}
    assert not builtin & set(schemas)
    for schema in schemas.values():
        assert schema.category == "FLUX LoRA Trainer" and schema.display_name.startswith("FLUX LoRA Trainer: ")
        for put in schema.inputs:
            assert put.tooltip, f"{schema.node_id}.{put.id} has no tooltip"
        custom = [p.get_io_type() for p in [*schema.inputs, *schema.outputs]
                  if p.get_io_type() not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "IMAGE", "MASK", "MODEL",
                                             "CLIP", "LORA_MODEL")]
        assert all(c.startswith("FLUX_TRAIN_") for c in custom), custom
    train = {p.id: p for p in schemas["FluxLoraTrainerTrain"].inputs}
    assert (train["guidance_scale"].default, train["model_prediction_type"].default,
            train["timestep_sampling"].default, train["max_train_steps"].default) == \
        (rec.flow.guidance_scale, rec.flow.model_prediction_type, rec.flow.timestep_sampling, rec.run.max_train_steps)
    assert train["timestep_sampling"].options == list(pack("trainer.config").TIMESTEP_SAMPLINGS)
    assert schemas["FluxLoraTrainerTrain"].is_output_node and not schemas["FluxLoraTrainerTrain"].not_idempotent
    assert io.Hidden.unique_id in schemas["FluxLoraTrainerTrain"].hidden
    assert train["seed"].control_after_generate is False  # a randomised seed would retrain on every queue
    network = {p.id: p for p in schemas["FluxLoraTrainerNetwork"].inputs}
    assert network["network_dim"].default == rec.network.network_dim
    optimizer = {p.id: p for p in schemas["FluxLoraTrainerOptimizer"].inputs}
    assert optimizer["optimizer_type"].options == list(pack("trainer.config").OPTIMIZERS)
    assert optimizer["learning_rate"].default == rec.optimizer.learning_rate
    outputs = [o.get_io_type() for o in schemas["FluxLoraTrainerTrain"].outputs]
    assert outputs == ["LORA_MODEL", "STRING", "IMAGE", "IMAGE", "FLUX_TRAIN_CHECKPOINTS"]


@pytest.fixture
def input_folder(comfy, tmp_path):
    from PIL import Image

    folder_paths, _ = comfy
    old = folder_paths.get_input_directory()
    (tmp_path / "set").mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 90, 50, 50)).save(tmp_path / "set" / f"{i}.png")
    (tmp_path / "set" / "0.caption").write_text("a red square")
    folder_paths.set_input_directory(str(tmp_path))
    yield tmp_path
    folder_paths.set_input_directory(old)


def test_dataset_node_returns_node_output_with_the_preflight_report(input_folder):
    dataset = pack("nodes.dataset")
    t = pack("nodes.translate")
    node = dataset.FluxLoraTrainerDataset
    widgets = {p.id: p.default for p in node.GET_SCHEMA().inputs if p.id != "datasets"}
    out = node.execute(**{**widgets, "image_folder": "set", "resolution": 64})
    (datasets,) = out.args
    assert datasets[0].subsets[0].image_dir == str(input_folder / "set") and datasets[0].resolution == (64, 64)
    text = out.ui["text"][0]
    assert "2 images" in text and "1 of 2 images have a caption file" in text and "train node" in text
    again = node.execute(**{**widgets, "image_folder": "set", "resolution": 128, "batch_size": 2, "datasets": datasets})
    assert [d.resolution for d in again.args[0]] == [(64, 64), (128, 128)]
    with pytest.raises(ValueError, match="'..' is not allowed") as e:
        node.execute(**{**widgets, "image_folder": "../elsewhere"})
    assert type(e.value) is ValueError  # a plain exception carrying the core's message
    assert isinstance(node.fingerprint_inputs(image_folder="set", caption_extension=".caption"), str)
    assert t.default(pack("trainer.config").SubsetConfig, "caption_extension") == widgets["caption_extension"]
    toml = dataset.FluxLoraTrainerDatasetToml.execute(
        toml_file="", toml_text='[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "set"\n')
    assert toml.args[0][0].subsets[0].image_dir == str(input_folder / "set") and "2 images" in toml.ui["text"][0]


def test_models_node_checks_each_slot_with_the_cores_message(comfy, tiny_files):
    folder_paths, _ = comfy
    files = tiny_files
    for key in ("diffusion_models", "text_encoders", "vae"):
        folder_paths.add_model_folder_path(key, str(files["flux"].parent))
    node = pack("nodes.models").FluxLoraTrainerModels
    out = node.execute(transformer="flux.safetensors", clip_l="clip_l.safetensors", t5xxl="t5xxl_fp16.safetensors",
                       ae="ae.safetensors", checkpoint="(none)", base_precision="fp8_e4m3fn", t5xxl_fp8=False)
    (models,) = out.args
    assert isinstance(models, pack("nodes.pieces").ModelFiles)  # the socket carries a typed, checked value
    assert models.models.pretrained_model_name_or_path == str(files["flux"]) and models.fp8_base is True
    assert Path(models.models.clip_l_tokenizer).name == "sd1_tokenizer" and "FLUX.1 dev" in out.ui["text"][0]
    with pytest.raises(ValueError, match="clip_l") as e:
        node.execute(transformer="flux.safetensors", clip_l="ae.safetensors", t5xxl="t5xxl_fp16.safetensors",
                     ae="ae.safetensors", checkpoint="(none)", base_precision="bf16", t5xxl_fp8=False)
    assert "expected" in str(e.value) or "holds" in str(e.value)


def test_light_nodes_return_node_output_with_status_text(comfy):
    pieces, sections = pack("nodes.pieces"), pack("trainer.config.sections")
    for module, node_id, changes, typed in (
            ("optimizer", "FluxLoraTrainerOptimizer", {"optimizer_type": "Adafactor"}, sections.OptimizerConfig),
            ("memory", "FluxLoraTrainerMemory", {}, pieces.MemoryChoice),
            ("network", "FluxLoraTrainerNetwork", {"double_blocks": "0-3"}, pieces.NetworkChoice)):
        node = getattr(pack(f"nodes.{module}"), node_id)
        widgets = {p.id: p.default for p in node.GET_SCHEMA().inputs}
        out = node.execute(**{**widgets, **changes})
        assert len(out.args) == 1 and out.ui["text"][0], node_id
        assert isinstance(out.args[0], typed), node_id  # one typed value per socket
    node = pack("nodes.network").FluxLoraTrainerNetwork
    widgets = {p.id: p.default for p in node.GET_SCHEMA().inputs}
    with pytest.raises(ValueError, match="train_double_block_indices: 'x' in 'x' is not an index"):
        node.execute(**{**widgets, "double_blocks": "x"})

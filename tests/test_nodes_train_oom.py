"""The train node's side of out of memory (issue 18): the core's OutOfMemoryError reaches ComfyUI as its one message
(a plain exception, no torch traceback), and the memory node's `auto` asks the core to step down by itself. ComfyUI's
own API and folder_paths from the snapshot; its model management is a stand-in (no GPU here). Skipped without the
snapshot."""

import sys
import types

import pytest
import torch
from packimport import pack
from test_nodes_schema import COMFYUI, HAVE_COMFYUI

pytestmark = pytest.mark.skipif(not HAVE_COMFYUI, reason=f"ComfyUI not found at {COMFYUI}")
MESSAGE = ("out of memory while training step 3 of 5. Resident: transformer (bf16 weights, no blocks swapped, "
           "gradient checkpointing) on cuda:0. Next: at 1024² on 15.6 GiB free: --blocks_to_swap 19, or --fp8_base.")


@pytest.fixture
def comfy(monkeypatch, tmp_path, tiny_files):
    if str(COMFYUI) not in sys.path:
        monkeypatch.syspath_prepend(str(COMFYUI))
    import comfy as comfy_package
    import folder_paths

    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.get_free_memory = lambda device=None: 8 * 2**30
    mm.unload_all_models = mm.soft_empty_cache = lambda *a, **k: None
    mm.interrupt_current_processing = mm.throw_exception_if_processing_interrupted = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setattr(comfy_package, "model_management", mm, raising=False)
    for key in ("diffusion_models", "text_encoders", "vae"):
        folder_paths.add_model_folder_path(key, str(tiny_files["flux"].parent))
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    images = tmp_path / "input" / "set"
    images.mkdir(parents=True)
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (64, 64), (i * 90, 50, 50)).save(images / f"{i}.png")
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path / "input"))
    return folder_paths


class Reporter:
    cancelled, log, previews = False, [], []

    def emit(self, event):
        pass

    def should_stop(self):
        return False


def _inputs():
    models = pack("nodes.models").FluxLoraTrainerModels.execute(
        transformer="flux.safetensors", clip_l="clip_l.safetensors", t5xxl="t5xxl_fp16.safetensors",
        ae="ae.safetensors", checkpoint="(none)", base_precision="bf16", t5xxl_fp8=False).args[0]
    dataset = pack("nodes.dataset").FluxLoraTrainerDataset
    widgets = {p.id: p.default for p in dataset.GET_SCHEMA().inputs if p.id != "datasets"}
    datasets = dataset.execute(**{**widgets, "image_folder": "set", "resolution": 64}).args[0]
    memory = pack("nodes.memory").FluxLoraTrainerMemory
    widgets = {p.id: p.default for p in memory.GET_SCHEMA().inputs}
    auto = memory.execute(**{**widgets, "mode": "auto"}).args[0]
    return models, datasets, auto


@pytest.mark.parametrize("auto", [False, True], ids=["manual", "auto"])
def test_out_of_memory_reaches_the_node_as_its_message_and_auto_steps_down(comfy, monkeypatch, auto):
    errors, calls = pack("trainer.errors"), []

    def train(config, reporter, *, step_down=False):
        calls.append(step_down)
        raise errors.OutOfMemoryError(MESSAGE, phase="training step 3 of 5", step=2)

    monkeypatch.setattr(pack("trainer.loop"), "train", train)
    monkeypatch.setattr(pack("nodes.reporter").ComfyReporter, "for_node", classmethod(lambda cls, node_id: Reporter()))
    models, datasets, memory = _inputs()
    node = pack("nodes.train").FluxLoraTrainerTrain
    widgets = {p.id: p.default for p in node.GET_SCHEMA().inputs
               if p.id not in ("models", "datasets", "network", "optimizer", "memory")}
    with pytest.raises(ValueError) as info:
        node.execute(**{**widgets, "models": models, "datasets": datasets, "memory": memory if auto else None,
                        "max_train_steps": 5})
    assert type(info.value) is ValueError and str(info.value) == MESSAGE
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no torch traceback on the node
    assert calls == [auto]

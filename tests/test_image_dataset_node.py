"""The "Dataset from Images" node against ComfyUI's own V3 API (the snapshot in .comfyui/ComfyUI, or $COMFYUI_DIR):
its schema, and `execute` with its inputs shaped as ComfyUI passes them to an is_input_list node (every input a
list: IMAGE batches or a list output's pictures, caption texts, one-value widget lists). Skipped where ComfyUI is
absent; the real server runs it in tests/test_comfyui_image_dataset.py."""

import os
import sys
from pathlib import Path

import pytest
import torch
from packimport import REPO, pack

COMFYUI = Path(os.environ.get("COMFYUI_DIR", REPO / ".comfyui" / "ComfyUI"))
pytestmark = pytest.mark.skipif(not (COMFYUI / "comfy_api" / "latest" / "__init__.py").is_file(),
                                reason=f"ComfyUI not found at {COMFYUI}")
NODE_ID = "FluxLoraTrainerImageDataset"
# the folder node's widgets, in the order a saved workflow's widgets_values holds them
FOLDER_WIDGETS = ["image_folder", "resolution", "height", "batch_size", "num_repeats", "caption_extension",
                  "class_tokens", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                  "bucket_no_upscale", "shuffle_caption", "keep_tokens", "caption_separator", "caption_dropout_rate",
                  "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "flip_aug", "random_crop", "is_reg",
                  "network_multiplier", "extra_options", "mask_folder"]


@pytest.fixture
def comfy_output(tmp_path):
    if str(COMFYUI) not in sys.path:
        sys.path.append(str(COMFYUI))
    import folder_paths

    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    yield tmp_path / "output"
    folder_paths.set_output_directory(old)


def node_class():
    return pack("nodes.dataset").FluxLoraTrainerImageDataset


def listed_widgets(**changes) -> dict:
    """Every widget at its default, as ComfyUI passes widgets to an is_input_list node: [value]."""
    values = {p.id: p.default for p in node_class().GET_SCHEMA().inputs
              if p.id not in ("datasets", "images", "masks", "captions")}
    values.update({"resolution": 64, "min_bucket_reso": 64, **changes})
    return {k: [v] for k, v in values.items()}


def test_the_node_is_listed_takes_lists_and_shares_the_folder_nodes_options(comfy_output):
    nodes = {n.GET_SCHEMA().node_id: n for n in pack("nodes").node_list()}
    schema = nodes[NODE_ID].GET_SCHEMA()
    assert schema.is_input_list and schema.display_name == "FLUX LoRA Trainer: Dataset from Images"
    inputs = {p.id: p for p in schema.inputs}
    assert [p.get_io_type() for p in schema.inputs[:5]] == ["FLUX_TRAIN_DATASETS", "IMAGE", "MASK", "STRING",
                                                            "BOOLEAN"]
    assert inputs["masks"].optional and inputs["datasets"].optional and inputs["captions"].multiline
    folder = [p.id for p in nodes["FluxLoraTrainerDataset"].GET_SCHEMA().inputs]
    assert folder[1:] == FOLDER_WIDGETS  # unchanged: saved workflows keep their widget values
    shared = [w for w in FOLDER_WIDGETS if w not in ("image_folder", "caption_extension", "mask_folder")]
    assert [p.id for p in schema.inputs[5:]] == shared
    outputs = [o.get_io_type() for o in schema.outputs]
    assert outputs == ["FLUX_TRAIN_DATASETS"]


def test_a_batch_and_captions_from_a_text_box_train_from_our_cache_folder(comfy_output):
    out = node_class().execute(images=[torch.rand(2, 64, 64, 3)], captions=["a red cat\nthe blue dog"],
                               **listed_widgets(num_repeats=3, class_tokens="sks"))
    (datasets,) = out.args
    (subset,) = datasets[0].subsets
    folder = Path(subset.image_dir)
    assert folder.parent == comfy_output / "flux_lora_trainer" / "cache" / "image_sets"
    assert (subset.num_repeats, subset.class_tokens, subset.caption_extension, subset.alpha_mask) == \
        (3, "sks", ".txt", False)
    assert (folder / "0002.txt").read_text() == "the blue dog"
    text = out.ui["text"][0]
    assert text.startswith("images from the graph: 2 (2 x 64x64)") and f"written to {folder}" in text
    assert "2 of 2 images have a caption file" in text and "train node" in text  # the core's pre-flight report
    again = node_class().execute(images=[torch.rand(2, 64, 64, 3)], captions=["a red cat\nthe blue dog"],
                                 datasets=[datasets], **listed_widgets(resolution=128))
    assert len(again.args[0]) == 2 and again.args[0][0] == datasets[0]  # chained after the first
    assert Path(again.args[0][1].subsets[0].image_dir) != folder  # other pixels: another folder


def test_a_list_of_mixed_sizes_with_a_caption_list_and_masks(comfy_output):
    images = [torch.rand(1, 64, 64, 3), torch.rand(1, 48, 80, 3)]  # a list output: one tensor per picture
    masks = [torch.ones(1, 64, 64), torch.zeros(1, 48, 80)]
    out = node_class().execute(images=images, masks=masks, captions=["first", "second"],
                               **listed_widgets(enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128))
    (subset,) = out.args[0][0].subsets
    assert subset.alpha_mask is True
    text = out.ui["text"][0]
    assert "images from the graph: 2 (1 x 64x64, 1 x 80x48)" in text and "masks: alpha masks" in text
    again = node_class().execute(images=images, masks=masks, captions=["first", "second"],
                                 **listed_widgets(enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128))
    assert again.args[0][0].subsets[0].image_dir == subset.image_dir and "reused" in again.ui["text"][0]


@pytest.fixture
def comfy_input(tmp_path):
    if str(COMFYUI) not in sys.path:
        sys.path.append(str(COMFYUI))
    import folder_paths

    old = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    yield tmp_path / "input"
    folder_paths.set_input_directory(old)


def test_the_folder_node_and_the_toml_node_read_mask_folders_under_the_input_folder(comfy_input):
    from PIL import Image

    for folder, value in (("subject", 120), ("subject_masks", 0)):
        (comfy_input / folder).mkdir(parents=True)
        Image.new("RGB", (64, 64), (value, 0, 0)).save(comfy_input / folder / "a.png")
    Image.new("RGB", (64, 64), (255, 0, 0)).save(comfy_input / "subject_masks" / "unused.png")
    dataset = pack("nodes.dataset")
    node = dataset.FluxLoraTrainerDataset
    widgets = {p.id: p.default for p in node.GET_SCHEMA().inputs if p.id != "datasets"}
    assert widgets["mask_folder"] == ""  # a saved workflow without the widget trains without masks, as before
    out = node.execute(**{**widgets, "image_folder": "subject", "mask_folder": "subject_masks", "resolution": 64})
    (subset,) = out.args[0][0].subsets
    assert subset.conditioning_data_dir == str(comfy_input / "subject_masks") and not subset.alpha_mask
    batch = pack("trainer.data").FluxDataset(out.args[0][0]).batch(0)
    assert batch.alpha_masks.shape == (1, 64, 64) and batch.alpha_masks.max() == 0  # the mask, not the image
    with pytest.raises(ValueError, match="mask_folder '../elsewhere': .*'..' is not allowed"):
        node.execute(**{**widgets, "image_folder": "subject", "mask_folder": "../elsewhere", "resolution": 64})
    with pytest.raises(ValueError, match="extra_options: 'conditioning_data_dir' is set by the node's folder"):
        node.execute(**{**widgets, "image_folder": "subject", "resolution": 64,
                        "extra_options": 'conditioning_data_dir = "subject_masks"'})
    plain = node.fingerprint_inputs(image_folder="subject", caption_extension=".txt")
    masked = node.fingerprint_inputs(image_folder="subject", caption_extension=".txt", mask_folder="subject_masks")
    Image.new("RGB", (64, 64), (9, 0, 0)).save(comfy_input / "subject_masks" / "a.png")
    assert plain != masked != node.fingerprint_inputs(image_folder="subject", caption_extension=".txt",
                                                      mask_folder="subject_masks")  # an edited mask runs it again
    toml = dataset.FluxLoraTrainerDatasetToml.execute(toml_file="", toml_text=(
        '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "subject"\n'
        'conditioning_data_dir = "subject_masks"\n'))
    assert toml.args[0][0].subsets[0].conditioning_data_dir == str(comfy_input / "subject_masks")


def test_errors_are_plain_node_errors_naming_both_counts(comfy_output):
    with pytest.raises(ValueError, match="captions: 3 captions for 2 images") as e:
        node_class().execute(images=[torch.rand(2, 64, 64, 3)], captions=["a", "b", "c"], **listed_widgets())
    assert type(e.value) is ValueError
    with pytest.raises(ValueError, match="masks: 1 masks for 2 images"):
        node_class().execute(images=[torch.rand(2, 64, 64, 3)], masks=[torch.ones(1, 64, 64)], **listed_widgets())
    with pytest.raises(ValueError, match="resolution: one value expected, got a list of 2"):
        node_class().execute(images=[torch.rand(1, 64, 64, 3)], **{**listed_widgets(), "resolution": [64, 128]})
    with pytest.raises(ValueError, match="extra_options: 'alpha_mask' is set by the image-set node"):
        node_class().execute(images=[torch.rand(1, 64, 64, 3)], **listed_widgets(extra_options="alpha_mask = true"))
    assert not (comfy_output / "flux_lora_trainer" / "cache" / "image_sets").exists() or \
        all((f / ".image_set.json").is_file() for f in (comfy_output / "flux_lora_trainer" / "cache" /
                                                         "image_sets").iterdir())

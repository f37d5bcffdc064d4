"""Dataset nodes: one image folder per node, chained for several resolutions or folders (a DATASETS input and
output), an sd-scripts dataset TOML, or images made by other nodes (written once into our cache folder). Each shows
the core's pre-flight report (images, skipped files, captions, buckets, batches) of the whole chain when it runs.
Image folders are only ever read."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.config import DatasetConfig, SubsetConfig
from ..trainer.errors import DatasetConfigError
from .common import CATEGORY, PREFIX, Datasets, input_dir, node_errors, output_dir
from .paths import folder_signature, image_set_root, resolve_input_folder
from .translate import (
    chain,
    dataset_config,
    dataset_folders,
    default,
    image_set_config,
    preview_config,
    report_lines,
    toml_datasets,
)

DEFAULT_RESOLUTION = 1024  # FLUX.1's native size; the core has no default (sd-scripts requires one)


def _report(datasets: tuple) -> str:
    from ..trainer.preflight import preflight_report

    return "\n".join(report_lines(preflight_report(preview_config(datasets))))


def _d(name: str):
    return default(DatasetConfig, name)


def _s(name: str):
    return default(SubsetConfig, name)


def _dataset_inputs(caption_files: bool) -> list:
    """The options the folder node and the image-set node share, in the folder node's order (a saved workflow's
    widget values are positional); `caption_files`: the folder node's caption_extension widget."""
    inputs = [
        io.Int.Input("resolution", default=DEFAULT_RESOLUTION, min=64, max=4096,
                     tooltip="Training size (width; also the height unless 'height' is set). Without "
                             "buckets a multiple of 16."),
        io.Int.Input("height", default=0, min=0, max=4096,
                     tooltip="Training height; 0 = same as resolution (square)."),
        io.Int.Input("batch_size", default=_d("batch_size"), min=1, max=64,
                     tooltip="Images per step for this dataset."),
        io.Int.Input("num_repeats", default=_s("num_repeats"), min=1, max=10000,
                     tooltip="How often each image is seen per epoch."),
    ]
    if caption_files:
        inputs.append(
            io.String.Input("caption_extension", default=_s("caption_extension"),
                            tooltip="Caption file beside each image: <image name><extension>, e.g. .txt or "
                                    ".caption. Images without one use the class tokens."))
    inputs += [
        io.String.Input("class_tokens", default=_s("class_tokens") or "",
                        tooltip="Caption for images without a caption file (e.g. 'photo of sks person')."),
        io.Boolean.Input("enable_bucket", default=_d("enable_bucket"),
                         tooltip="Aspect-ratio buckets: keep images' shapes instead of cropping to a square."),
        io.Int.Input("min_bucket_reso", default=_d("min_bucket_reso"), min=64, max=4096,
                     tooltip="Smallest bucket side."),
        io.Int.Input("max_bucket_reso", default=_d("max_bucket_reso"), min=64, max=8192,
                     tooltip="Largest bucket side (at least the resolution unless no-upscale)."),
        io.Int.Input("bucket_reso_steps", default=_d("bucket_reso_steps"), min=16, max=256,
                     tooltip="Bucket sides are multiples of this (a multiple of 16 for FLUX)."),
        io.Boolean.Input("bucket_no_upscale", default=_d("bucket_no_upscale"),
                         tooltip="Never enlarge small images: they get a bucket of their own size."),
        io.Boolean.Input("shuffle_caption", default=_s("shuffle_caption"),
                         tooltip="Shuffle the caption's tags each step (turns off text-encoder caching)."),
        io.Int.Input("keep_tokens", default=_s("keep_tokens"), min=0, max=255,
                     tooltip="Tags at the start that shuffling and tag dropout never touch."),
        io.String.Input("caption_separator", default=_s("caption_separator"),
                        tooltip="What separates tags in a caption."),
        io.Float.Input("caption_dropout_rate", default=_s("caption_dropout_rate"), min=0.0, max=1.0,
                       step=0.01, tooltip="Share of steps that train with an empty caption."),
        io.Int.Input("caption_dropout_every_n_epochs", default=_s("caption_dropout_every_n_epochs"), min=0,
                     max=10000, tooltip="Every N epochs train with empty captions (0 = never)."),
        io.Float.Input("caption_tag_dropout_rate", default=_s("caption_tag_dropout_rate"), min=0.0,
                       max=1.0, step=0.01, tooltip="Chance to drop each tag of a caption."),
        io.Boolean.Input("flip_aug", default=_s("flip_aug"),
                         tooltip="Mirror images at random (works with latent caching)."),
        io.Boolean.Input("random_crop", default=_s("random_crop"),
                         tooltip="Random instead of centred crops (turns off latent caching)."),
        io.Boolean.Input("is_reg", default=_s("is_reg"),
                         tooltip="Regularisation images (weighted by prior_loss_weight)."),
        io.Float.Input("network_multiplier", default=_d("network_multiplier"), min=-8.0, max=8.0,
                       step=0.05, tooltip="LoRA strength while training on this dataset."),
        io.String.Input("extra_options", multiline=True, default="",
                        tooltip="Further sd-scripts dataset/subset keys in TOML syntax, one per line, e.g. "
                                "color_aug = true, caption_prefix = \"photo, \", keep_tokens_separator = "
                                "\"|||\", " + ("alpha_mask = true, " if caption_files else "")
                                + "resize_interpolation = \"lanczos\"."),
    ]
    return inputs


class FluxLoraTrainerDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}Dataset", display_name="FLUX LoRA Trainer: Dataset", category=CATEGORY,
            description="One folder of images (with caption files) at one resolution. Chain several for several "
                        "folders or resolutions, each with its own batch size. Shows the pre-flight report.",
            inputs=[
                Datasets.Input("datasets", optional=True,
                               tooltip="Datasets from another dataset node: this one is added to them."),
                io.String.Input("image_folder", default="", placeholder="my_subject (under ComfyUI/input)",
                                tooltip="Folder of images: relative to ComfyUI's input folder (it may not leave it), "
                                        "or an absolute path. Only read, never written (disk caches go to "
                                        "output/flux_lora_trainer/cache)."),
                *_dataset_inputs(caption_files=True),
                # last: a saved workflow's widget values are positional
                io.String.Input("mask_folder", default="", placeholder="my_subject_masks (optional)",
                                tooltip="Optional folder of loss masks, one per image with the image's name and "
                                        "size (sd-scripts' conditioning_data_dir): the red channel weighs the loss "
                                        "(white trains fully, black not at all). Found like image_folder; only "
                                        "read. Empty: no masks."),
            ],
            outputs=[Datasets.Output("all_datasets", display_name="datasets",
                                     tooltip="All datasets so far, this one last.")],
        )

    @classmethod
    def execute(cls, image_folder, resolution, height, extra_options, datasets=None, mask_folder="",
                **widgets) -> io.NodeOutput:
        with node_errors():
            config = dataset_config(image_folder, input_dir(), resolution, height, extra_options, mask_folder,
                                    **widgets)
            all_datasets = chain(datasets, config)
            text = _report(all_datasets)
        return io.NodeOutput(all_datasets, ui={"text": [text]})

    @classmethod
    def fingerprint_inputs(cls, image_folder="", caption_extension="", mask_folder="", **_) -> str:
        """Adding, removing or editing images, captions or masks runs the node (and training) again."""
        try:
            folders = [resolve_input_folder(image_folder, input_dir())]
            if (mask_folder or "").strip():
                folders.append(resolve_input_folder(mask_folder, input_dir(), "mask_folder"))
        except Exception:
            return f"unresolved:{image_folder}:{mask_folder}"
        return folder_signature(folders, (caption_extension,))


class FluxLoraTrainerDatasetToml(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}DatasetToml", display_name="FLUX LoRA Trainer: Dataset TOML", category=CATEGORY,
            description="Datasets from an sd-scripts dataset TOML ([general], [[datasets]], [[datasets.subsets]]), "
                        "as a file or pasted text. Shows the pre-flight report.",
            inputs=[
                Datasets.Input("datasets", optional=True,
                               tooltip="Datasets from another dataset node: these are added to them."),
                io.String.Input("toml_file", default="", placeholder="datasets.toml (under ComfyUI/input)",
                                tooltip="A dataset TOML file: relative to ComfyUI's input folder, or an absolute "
                                        "path. Leave empty to use the text below."),
                io.String.Input("toml_text", multiline=True, default="",
                                tooltip="The dataset TOML itself (used when no file is given). Relative image_dir "
                                        "values are read under ComfyUI's input folder."),
            ],
            outputs=[Datasets.Output("all_datasets", display_name="datasets",
                                     tooltip="All datasets so far, these last.")],
        )

    @classmethod
    def execute(cls, toml_file, toml_text, datasets=None) -> io.NodeOutput:
        with node_errors():
            all_datasets = chain(datasets, *toml_datasets(toml_file, toml_text, input_dir()))
            text = _report(all_datasets)
        return io.NodeOutput(all_datasets, ui={"text": [text]})

    @classmethod
    def fingerprint_inputs(cls, toml_file="", toml_text="", **_) -> str:
        try:
            found = toml_datasets(toml_file, toml_text, input_dir())
        except Exception as e:
            return f"unresolved:{e}"
        exts = tuple({s.caption_extension for d in found for s in d.subsets})
        return folder_signature(dataset_folders(tuple(found)), exts) + repr(found)


class FluxLoraTrainerImageDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}ImageDataset", display_name="FLUX LoRA Trainer: Dataset from Images",
            category=CATEGORY, is_input_list=True,
            description="A dataset from images made by other nodes (a batch or a list, any sizes), with captions as "
                        "text and optional masks as loss weights. The images are written once, by content, into "
                        "output/flux_lora_trainer/cache/image_sets; the same images are never written or trained "
                        "twice. Chain it with the other dataset nodes. Shows the pre-flight report.",
            inputs=[
                Datasets.Input("datasets", optional=True,
                               tooltip="Datasets from another dataset node: this one is added to them."),
                io.Image.Input("images", tooltip="The training images: a batch, or a list (e.g. from ComfyUI's "
                                                 "dataset loaders); a list may mix sizes."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Loss weights, one mask per image, each the size of its image: 1 = trained "
                                      "fully, 0 = ignored (stored as the PNG's alpha; alpha_mask is set). "
                                      "LoadImage's mask is 1 where the picture was transparent: set invert_mask."),
                io.String.Input("captions", multiline=True, default="",
                                tooltip="One line per image in the images' order, or a list of texts (one per "
                                        "image), from this box or any text node. Empty: every image uses "
                                        "class_tokens. A blank line: that image uses class_tokens."),
                io.Boolean.Input("invert_mask", default=False,
                                 tooltip="Use 1 - mask as the loss weight (for masks that mark what to leave out, "
                                         "like LoadImage's)."),
                *_dataset_inputs(caption_files=False),
            ],
            outputs=[Datasets.Output("all_datasets", display_name="datasets",
                                     tooltip="All datasets so far, this one last.")],
        )

    @classmethod
    def execute(cls, images, captions=None, masks=None, datasets=None, **listed) -> io.NodeOutput:
        """Every input arrives as a list (is_input_list): images, masks and captions may be lists of any length,
        the widgets are lists of one value."""
        from .image_dataset import image_set, summary_lines, write_image_set

        with node_errors():
            widgets = {name: one_value(name, value) for name, value in listed.items()}
            invert = widgets.pop("invert_mask", False)
            resolution, height, extra = (widgets.pop(k) for k in ("resolution", "height", "extra_options"))
            pictures = image_set(images, captions, masks, invert_mask=invert)
            written = write_image_set(pictures, image_set_root(output_dir()))
            config = image_set_config(written.folder, resolution, height, extra, alpha_mask=masks is not None,
                                      **widgets)
            all_datasets = chain(one_value("datasets", datasets) if datasets else None, config)
            text = "\n".join([*summary_lines(pictures, written), _report(all_datasets)])
        return io.NodeOutput(all_datasets, ui={"text": [text]})


def one_value(name: str, value):
    """A widget's value from an is_input_list node: a list of one value."""
    if not isinstance(value, list):
        return value
    if len(value) != 1:
        raise DatasetConfigError(f"{name}: one value expected, got a list of {len(value)}")
    return value[0]


NODES = [FluxLoraTrainerDataset, FluxLoraTrainerDatasetToml, FluxLoraTrainerImageDataset]

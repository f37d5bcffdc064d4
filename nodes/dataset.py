"""Dataset nodes: one image folder per node, chained for several resolutions or folders (a DATASETS input and
output), or an sd-scripts dataset TOML. Each shows the core's pre-flight report (images, skipped files, captions,
buckets, batches) of the whole chain when it runs. Image folders are only ever read."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.config import DatasetConfig, SubsetConfig
from .common import CATEGORY, PREFIX, Datasets, input_dir, node_errors
from .paths import folder_signature, resolve_input_folder
from .translate import chain, dataset_config, dataset_folders, default, preview_config, report_lines, toml_datasets

DEFAULT_RESOLUTION = 1024  # FLUX.1's native size; the core has no default (sd-scripts requires one)


def _report(datasets: tuple) -> str:
    from ..trainer.preflight import preflight_report

    return "\n".join(report_lines(preflight_report(preview_config(datasets))))


def _d(name: str):
    return default(DatasetConfig, name)


def _s(name: str):
    return default(SubsetConfig, name)


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
                io.Int.Input("resolution", default=DEFAULT_RESOLUTION, min=64, max=4096,
                             tooltip="Training size (width; also the height unless 'height' is set). Without "
                                     "buckets a multiple of 16."),
                io.Int.Input("height", default=0, min=0, max=4096,
                             tooltip="Training height; 0 = same as resolution (square)."),
                io.Int.Input("batch_size", default=_d("batch_size"), min=1, max=64,
                             tooltip="Images per step for this dataset."),
                io.Int.Input("num_repeats", default=_s("num_repeats"), min=1, max=10000,
                             tooltip="How often each image is seen per epoch."),
                io.String.Input("caption_extension", default=_s("caption_extension"),
                                tooltip="Caption file beside each image: <image name><extension>, e.g. .txt or "
                                        ".caption. Images without one use the class tokens."),
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
                                        "\"|||\", alpha_mask = true, resize_interpolation = \"lanczos\"."),
            ],
            outputs=[Datasets.Output("all_datasets", display_name="datasets",
                                     tooltip="All datasets so far, this one last.")],
        )

    @classmethod
    def execute(cls, image_folder, resolution, height, extra_options, datasets=None, **widgets) -> io.NodeOutput:
        with node_errors():
            config = dataset_config(image_folder, input_dir(), resolution, height, extra_options, **widgets)
            all_datasets = chain(datasets, config)
            text = _report(all_datasets)
        return io.NodeOutput(all_datasets, ui={"text": [text]})

    @classmethod
    def fingerprint_inputs(cls, image_folder="", caption_extension="", **_) -> str:
        """Adding, removing or editing images or captions runs the node (and training) again."""
        try:
            folder = resolve_input_folder(image_folder, input_dir())
        except Exception:
            return f"unresolved:{image_folder}"
        return folder_signature([folder], (caption_extension,))


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


NODES = [FluxLoraTrainerDataset, FluxLoraTrainerDatasetToml]

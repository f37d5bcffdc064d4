"""nodes/translate.py: every node's widgets -> the core's config pieces, without ComfyUI. Defaults come from the
core, bad values give the core's messages, and the train node assembles one TrainConfig."""

from pathlib import Path

import pytest
from packimport import PACK, REPO, pack  # noqa: F401
from PIL import Image

GIB = 2**30




t = pack("nodes.translate")
config = pack("trainer.config")
errors = pack("trainer.errors")
TrainerError, ConfigError = errors.TrainerError, errors.ConfigError

DATASET_DEFAULTS = {**{k: t.default(config.DatasetConfig, k) for k in t.DATASET_WIDGETS},
                    **{k: t.default(config.SubsetConfig, k) for k in t.SUBSET_WIDGETS}}
DATASET_DEFAULTS["class_tokens"] = ""
sections = pack("trainer.config.sections")
FILES = {"pretrained_model_name_or_path": "/m/flux.safetensors", "clip_l": "/m/clip_l.safetensors",
         "t5xxl": "/m/t5.safetensors", "ae": "/m/ae.safetensors"}
MODELS = t.ModelFiles(sections.ModelsConfig(**FILES))
FLOW = {"timestep_sampling": "flux_shift", "discrete_flow_shift": 3.0, "sigmoid_scale": 1.0,
        "model_prediction_type": "raw", "guidance_scale": 1.0, "loss_type": "l2"}


@pytest.fixture
def inputs(tmp_path):
    """ComfyUI's input folder with two small captioned image folders."""
    folder = tmp_path / "input"
    for name, count in (("faces", 3), ("styles", 2)):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (64 + 16 * i, 64), (40 * i, 80, 120)).save(folder / name / f"{i}.png")
            (folder / name / f"{i}.txt").write_text(f"photo {i}")
    return folder


def dataset(inputs, folder="faces", resolution=64, **changes):
    return t.dataset_config(folder, inputs, resolution, **{**DATASET_DEFAULTS, "caption_extension": ".txt", **changes})


def run(inputs, tmp_path, datasets=None, **kwargs):
    values = dict(models=MODELS, datasets=datasets or (dataset(inputs),), flow=FLOW, max_train_steps=10,
                  output_dir=tmp_path / "out" / "lora", output_name="lora", cache_dir=tmp_path / "cache")
    values.update(kwargs)
    return t.train_config(**values)


# ------------------------------------------------------------------------------------------ defaults

def test_widget_defaults_are_the_cores_recommended_values():
    rec = t.recommended()
    files = dict.fromkeys(("pretrained_model_name_or_path", "clip_l", "t5xxl", "ae", "train_data_dir"), t.PLACEHOLDER)
    plain = config.TrainConfig.from_flags(**files)  # the core's own (sd-scripts') defaults
    differs = {name for name, value in rec.flags().items() if value != plain.flags()[name]}
    differs |= {name for name in ("flow", "network") if getattr(rec, name) != getattr(plain, name)}
    assert differs == set(config.RECOMMENDED)  # the nodes start from the core's defaults but for its recommendations
    flags = {**rec.flags(), "flow": rec.flow, "network": rec.network}
    assert all(flags[name] == value for name, value in config.RECOMMENDED.items())
    assert {flags[name] for name in files} == {t.PLACEHOLDER}
    assert (rec.flow.guidance_scale, rec.flow.model_prediction_type, rec.flow.timestep_sampling) == \
        (1.0, "raw", "flux_shift")
    assert t.default(config.SubsetConfig, "caption_extension") == ".caption"
    assert t.default(config.LoRAConfig, "network_reg_dims") == ()
    with pytest.raises(KeyError):
        t.default(config.TrainConfig, "no_such_field")
    assert t.cache_mode(rec.caching.cache_latents, rec.caching.cache_latents_to_disk) == "memory"


# ------------------------------------------------------------------------------------------ models

def fake_full_path(folder, name):
    return {("diffusion_models", "flux1-dev.safetensors"): "/m/flux1-dev.safetensors",
            ("text_encoders", "clip_l.safetensors"): "/m/clip_l.safetensors",
            ("text_encoders", "t5xxl_fp16.safetensors"): "/m/t5xxl_fp16.safetensors",
            ("vae", "ae.safetensors"): "/m/ae.safetensors",
            ("checkpoints", "flux1-dev-fp8.safetensors"): "/m/flux1-dev-fp8.safetensors"}.get((folder, name))


def test_models_widgets_become_a_models_section_and_fp8_flags():
    files = t.model_fields(transformer="flux1-dev.safetensors", clip_l="clip_l.safetensors",
                           t5xxl="t5xxl_fp16.safetensors", ae="ae.safetensors", base_precision="fp8_e4m3fn",
                           t5xxl_fp8=True, full_path=fake_full_path, tokenizers=("/tok/clip", "/tok/t5"))
    assert files == t.ModelFiles(sections.ModelsConfig(
        pretrained_model_name_or_path="/m/flux1-dev.safetensors", clip_l="/m/clip_l.safetensors",
        t5xxl="/m/t5xxl_fp16.safetensors", ae="/m/ae.safetensors", clip_l_tokenizer="/tok/clip",
        t5xxl_tokenizer="/tok/t5"), fp8_base=True, t5xxl_fp8=True)
    assert files.source().flags == {"pretrained_model_name_or_path": "/m/flux1-dev.safetensors",
                                    "clip_l": "/m/clip_l.safetensors", "t5xxl": "/m/t5xxl_fp16.safetensors",
                                    "ae": "/m/ae.safetensors", "model_type": "flux", "clip_l_tokenizer": "/tok/clip",
                                    "t5xxl_tokenizer": "/tok/t5", "fp8_base": True, "t5xxl_fp8": True}
    chroma = t.for_transformer(files, "chroma").models
    assert (chroma.model_type, chroma.clip_l) == ("chroma", None) and t.for_transformer(files, "dev") is files


def test_models_from_a_full_checkpoint_and_missing_files_name_the_slot():
    files = t.model_fields(transformer=t.FROM_CHECKPOINT, clip_l=t.FROM_CHECKPOINT, t5xxl="t5xxl_fp16.safetensors",
                           ae=t.FROM_CHECKPOINT, checkpoint="flux1-dev-fp8.safetensors", full_path=fake_full_path)
    assert files.models.pretrained_model_name_or_path == files.models.ae == "/m/flux1-dev-fp8.safetensors"
    assert files.models.t5xxl == "/m/t5xxl_fp16.safetensors" and files.fp8_base is False
    with pytest.raises(ConfigError, match="transformer: .* needs a full checkpoint"):
        t.model_fields(transformer=t.FROM_CHECKPOINT, clip_l="clip_l.safetensors", t5xxl="t5xxl_fp16.safetensors",
                       ae="ae.safetensors", full_path=fake_full_path)
    with pytest.raises(ConfigError, match="ae: 'gone.safetensors' is not in ComfyUI's vae folder"):
        t.model_fields(transformer="flux1-dev.safetensors", clip_l="clip_l.safetensors",
                       t5xxl="t5xxl_fp16.safetensors", ae="gone.safetensors", full_path=fake_full_path)
    with pytest.raises(ConfigError, match="base_precision"):
        t.model_fields(transformer="flux1-dev.safetensors", clip_l="clip_l.safetensors",
                       t5xxl="t5xxl_fp16.safetensors", ae="ae.safetensors", base_precision="fp4",
                       full_path=fake_full_path)


def test_comfyui_tokenizer_folders_are_checked(tmp_path):
    comfy = REPO / ".comfyui" / "ComfyUI" / "comfy"
    if comfy.is_dir():
        clip, t5 = t.comfy_tokenizers(comfy)
        assert (Path(clip) / "vocab.json").is_file() and (Path(t5) / "tokenizer.json").is_file()
    (tmp_path / "sd1_tokenizer").mkdir()
    (tmp_path / "sd1_tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(ConfigError, match="lacks merges.txt"):
        t.comfy_tokenizers(tmp_path)


# ------------------------------------------------------------------------------------------ datasets

def test_dataset_widgets_land_in_dataset_and_subset_config(inputs):
    d = dataset(inputs, resolution=768, height=512, batch_size=2, num_repeats=10, class_tokens="sks dog",
                enable_bucket=True, min_bucket_reso=256, max_bucket_reso=1024, bucket_reso_steps=32,
                bucket_no_upscale=True, shuffle_caption=True, keep_tokens=2, caption_separator=";",
                caption_dropout_rate=0.1, caption_dropout_every_n_epochs=3, caption_tag_dropout_rate=0.2,
                flip_aug=True, random_crop=True, is_reg=True, network_multiplier=0.5,
                extra_options='color_aug = true\ncaption_prefix = "photo, "')
    assert (d.resolution, d.batch_size, d.enable_bucket, d.min_bucket_reso, d.max_bucket_reso, d.bucket_reso_steps,
            d.bucket_no_upscale, d.network_multiplier) == ((768, 512), 2, True, 256, 1024, 32, True, 0.5)
    (s,) = d.subsets
    assert s.image_dir == str(inputs / "faces")
    assert (s.num_repeats, s.caption_extension, s.class_tokens, s.shuffle_caption, s.keep_tokens,
            s.caption_separator, s.caption_dropout_rate, s.caption_dropout_every_n_epochs,
            s.caption_tag_dropout_rate, s.flip_aug, s.random_crop, s.is_reg, s.color_aug, s.caption_prefix) == \
        (10, ".txt", "sks dog", True, 2, ";", 0.1, 3, 0.2, True, True, True, True, "photo, ")
    assert dataset(inputs).subsets[0].class_tokens is None  # empty text: the core's None


@pytest.mark.parametrize("changes, message", [
    ({"caption_dropout_rate": 1.5}, "'caption_dropout_rate' = 1.5: expected a number between 0 and 1"),
    ({"resolution": 70}, "without buckets each side must be a multiple of 16"),
    ({"enable_bucket": True, "bucket_reso_steps": 20}, "FLUX needs a multiple of 16"),
    ({"extra_options": "colour_aug = true"}, "unknown dataset options: colour_aug"),
    ({"extra_options": 'image_dir = "/etc"'}, "set by the node's folder widget"),
    ({"extra_options": "not toml"}, "not valid TOML"),
    ({"folder": "../faces"}, "'..' is not allowed"),
])
def test_bad_dataset_widgets_give_the_cores_message(inputs, changes, message):
    with pytest.raises(TrainerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dataset(inputs, **changes)


def test_three_chained_resolutions_are_three_datasets_with_their_own_batch_sizes(inputs, tmp_path):
    chained = None
    for resolution, batch in ((512, 4), (768, 2), (1024, 1)):
        chained = t.chain(chained, dataset(inputs, resolution=resolution, batch_size=batch))
    assert [(d.resolution, d.batch_size) for d in chained] == [((512, 512), 4), ((768, 768), 2), ((1024, 1024), 1)]
    assert run(inputs, tmp_path, datasets=chained).config.data.datasets == chained


def test_toml_text_and_file_resolve_image_dirs_under_input(inputs):
    text = '[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 512\nbatch_size = 2\n' \
           '[[datasets.subsets]]\nimage_dir = "faces"\nnum_repeats = 3\n[[datasets.subsets]]\nimage_dir = "styles"\n'
    (d,) = t.toml_datasets("", text, inputs)
    assert [s.image_dir for s in d.subsets] == [str(inputs / "faces"), str(inputs / "styles")]
    assert (d.resolution, d.batch_size, d.subsets[0].num_repeats, d.subsets[1].caption_extension) == \
        ((512, 512), 2, 3, ".txt")
    (inputs / "sets.toml").write_text(text)
    assert t.toml_datasets("sets.toml", "", inputs) == [d]
    with pytest.raises(TrainerError, match="'..' is not allowed"):
        t.toml_datasets("", text.replace('"faces"', '"../faces"'), inputs)
    with pytest.raises(TrainerError, match="exactly one of the two"):
        t.toml_datasets("sets.toml", text, inputs)
    with pytest.raises(TrainerError, match="unknown key 'colour'"):
        t.toml_datasets("", text + "colour = 1\n", inputs)


def test_dataset_report_is_the_cores_preflight_with_batches_instead_of_steps(inputs):
    preflight_report = pack("trainer.preflight").preflight_report
    chained = t.chain(None, dataset(inputs, "faces", batch_size=2), dataset(inputs, "styles"))
    lines = t.report_lines(preflight_report(t.preview_config(chained)))
    text = "\n".join(lines)
    assert "dataset 1: 64x64, batch size 2, 3 images" in text and "dataset 2: 64x64, batch size 1, 2 images" in text
    assert "4 batches per epoch (all chained datasets); steps or epochs are set on the train node" in text
    assert "steps in" not in text


# ------------------------------------------------------------------------------------------ network

NETWORK = dict(network_dim=16, network_alpha=8.0)


def test_network_widgets_become_a_lora_config():
    choice = t.network_fields(**NETWORK, train_double_block_indices="0-5,10", train_single_block_indices="none",
                              train_blocks="double", split_qkv=True, in_dims="4,0,0,0,4",
                              type_dims={"img_attn_dim": -1, "txt_attn_dim": 0, "single_dim": 8},
                              loraplus_lr_ratio=16.0, rank_dropout=0.1, module_dropout=0.0, network_dropout=0.05,
                              network_args="network_reg_dims=single.*linear1=8\n# a comment",
                              network_weights="/loras/old.safetensors", dim_from_weights=True)
    n = choice.network
    assert (n.network_dim, n.network_alpha, n.train_double_block_indices, n.train_single_block_indices,
            n.train_blocks, n.split_qkv, n.in_dims, n.img_attn_dim, n.txt_attn_dim, n.single_dim,
            n.loraplus_lr_ratio, n.rank_dropout, n.module_dropout, n.network_dropout, n.network_reg_dims,
            n.network_train_unet_only) == \
        (16, 8.0, "0-5,10", "none", "double", True, (4, 0, 0, 0, 4), None, 0, 8, 16.0, 0.1, None, 0.05,
         (("single.*linear1", 8),), True)
    assert choice.network_weights == "/loras/old.safetensors" and choice.dim_from_weights is True
    assert choice.text_encoder_lr is None


def test_block_presets_override_the_text_and_all_means_the_default():
    n = t.network_fields(**NETWORK, block_preset="single blocks only", train_double_block_indices="junk").network
    assert (n.train_double_block_indices, n.train_single_block_indices) == ("none", None)
    n = t.network_fields(**NETWORK, block_preset="single 10-20").network
    assert (n.train_double_block_indices, n.train_single_block_indices) == ("none", "10-20")
    for preset, blocks in t.BLOCK_PRESETS.items():
        if blocks:
            for text, count in zip(blocks, (19, 38)):
                config.parse_block_selection(text, count, "preset")  # every preset is valid core syntax


@pytest.mark.parametrize("changes, message", [
    ({"train_double_block_indices": "0-5,x"}, "train_double_block_indices: 'x' in '0-5,x' is not an index"),
    ({"train_single_block_indices": "9-3"}, "train_single_block_indices: range '9-3' runs backwards"),
    ({"in_dims": "4,0,0"}, "in_dims: expected exactly five whole numbers"),
    ({"in_dims": "a,b"}, "in_dims='a,b': expected five comma-separated whole numbers"),
    ({"network_args": "bogus=1"}, "unknown key 'bogus'"),
    ({"network_args": "no equals sign"}, "is not of the form key=value"),
    ({"train_blocks": "middle"}, "train_blocks: expected one of all, single, double"),
    ({"network_dropout": 1.0}, "network_dropout: expected a probability"),
    ({"block_preset": "most"}, "block_preset: expected one of custom"),
])
def test_bad_network_widgets_give_the_cores_message(changes, message):
    with pytest.raises(TrainerError, match=message.replace("(", r"\(").replace("[", r"\[")):
        t.network_fields(**{**NETWORK, **changes})


def test_text_encoder_loras_and_their_learning_rates(inputs, tmp_path):
    clip = t.network_fields(**NETWORK, train_clip_l=True, clip_l_lr=5e-5)
    assert clip.network.network_train_unet_only is False and clip.network.train_t5xxl is False
    assert clip.text_encoder_lr == (5e-5, None)
    plan = run(inputs, tmp_path, network=clip)
    assert plan.config.optimizer.text_encoder_lr == (5e-5, t.recommended().optimizer.learning_rate)
    assert plan.config.caching.cache_text_encoder_outputs  # CLIP-L training keeps T5's cached outputs
    t5_only = t.network_fields(**NETWORK, train_t5xxl=True, t5xxl_lr=2e-5)
    plan = run(inputs, tmp_path, network=t5_only, optimizer=t.optimizer_fields(
        optimizer_type="AdamW", learning_rate=3e-4, lr_scheduler="constant")[0])
    assert plan.config.optimizer.text_encoder_lr == (0.0, 2e-5)  # CLIP-L not trained: lr 0 leaves its group out
    assert not plan.config.caching.cache_text_encoder_outputs and any("T5-XXL is trained" in n for n in plan.notes)


# ------------------------------------------------------------------------------------------ optimizer

def test_optimizer_widgets_and_the_adafactor_recipe():
    section, notes = t.optimizer_fields(optimizer_type="adafactor", learning_rate=1e-4, lr_scheduler="constant",
                                        lr_warmup_steps=0.1, max_grad_norm=0.0)
    assert isinstance(section, sections.OptimizerConfig)
    assert section.optimizer_type == "Adafactor" and section.optimizer_args == config.ADAFACTOR_RECOMMENDED_ARGS
    assert section.lr_warmup_steps == 0.1 and section.max_grad_norm == 0.0 and notes
    section, notes = t.optimizer_fields(optimizer_type="AdamW8bit", learning_rate=2e-4, lr_scheduler="cosine",
                                        lr_warmup_steps=100, gradient_accumulation_steps=4,
                                        optimizer_args="weight_decay=0.01 betas=(0.9,0.99)\neps=1e-8")
    assert section.optimizer_args == ("weight_decay=0.01", "betas=(0.9,0.99)", "eps=1e-8") and not notes
    assert section.lr_warmup_steps == 100 and isinstance(section.lr_warmup_steps, int)
    assert section.gradient_accumulation_steps == 4


@pytest.mark.parametrize("changes, message", [
    ({"optimizer_type": "Adamm"}, "optimizer_type 'Adamm' is unknown"),
    ({"optimizer_args": "weight_decay"}, "optimizer_args: 'weight_decay' is not of the form key=value"),
    ({"lr_scheduler": "adafactor"}, "lr_scheduler adafactor follows the Adafactor optimizer"),
    ({"lr_scheduler": "sometimes"}, "lr_scheduler: expected one of constant"),
    ({"lr_scheduler_min_lr_ratio": 2.0}, "lr_scheduler_min_lr_ratio: expected a number between 0 and 1"),
])
def test_bad_optimizer_widgets_give_the_cores_message(changes, message):
    with pytest.raises(TrainerError, match=message):
        t.optimizer_fields(**{"optimizer_type": "AdamW", "learning_rate": 1e-4, "lr_scheduler": "constant",
                              **changes})


# ------------------------------------------------------------------------------------------ memory

def test_manual_memory_widgets():
    m = t.memory_fields(gradient_checkpointing=False, blocks_to_swap=18, fp8_base=True, latent_cache="disk",
                        text_cache="off", cache_beside_images=True)
    assert m.auto is False and m.cache_beside_images is True
    assert isinstance(m.memory, sections.MemoryConfig) and isinstance(m.caching, sections.CachingConfig)
    assert m.source().flags == {"gradient_checkpointing": False, "blocks_to_swap": 18,
                                "cpu_offload_checkpointing": False, "fp8_base": True, "cache_latents": True,
                                "cache_latents_to_disk": True, "cache_text_encoder_outputs": False,
                                "cache_text_encoder_outputs_to_disk": False}
    auto = t.memory_fields(mode="auto", gradient_checkpointing=False)
    assert auto.auto and auto.memory is None and auto.source().flags == {}
    with pytest.raises(ConfigError, match="blocks_to_swap and cpu_offload_checkpointing cannot be used together"):
        t.memory_fields(gradient_checkpointing=True, blocks_to_swap=4, cpu_offload_checkpointing=True)
    with pytest.raises(ConfigError, match="cpu_offload_checkpointing needs --gradient_checkpointing"):
        t.memory_fields(gradient_checkpointing=False, cpu_offload_checkpointing=True)
    with pytest.raises(ConfigError, match="latent_cache: expected one of memory, disk, off"):
        t.memory_fields(gradient_checkpointing=True, latent_cache="ssd")


@pytest.mark.parametrize("free_gib, row", [(23.4, 24), (15.5, 16), (11.6, 12), (9.6, 10), (7.6, 8)])
def test_auto_memory_fits_the_free_memory_with_the_fastest_settings(free_gib, row):
    from trainer.config.memory_plan import HEADROOM_GIB, estimate_peak_gib

    plan = t.plan_memory(free_gib * GIB, "cuda")
    assert plan.row == row and f"the guide's {row} GB row" in plan.text()
    assert plan.fields["fp8_base"] and plan.fields["gradient_checkpointing"] and plan.fields["cache_latents"]
    swap = plan.fields["blocks_to_swap"] or 0
    assert plan.estimate_gib == estimate_peak_gib(fp8=True, blocks_to_swap=swap) <= free_gib - HEADROOM_GIB
    if swap:  # the fewest swapped blocks that fit: one fewer would not
        assert estimate_peak_gib(fp8=True, blocks_to_swap=swap - 1) > free_gib - HEADROOM_GIB
        assert f"--blocks_to_swap {swap}" in plan.text()
    assert plan.fields["t5xxl_fp8"] == (free_gib < 12)
    config.TrainConfig.from_flags(**{**MODELS_FIELDS, **plan.fields})  # what auto picks is a valid configuration


def test_auto_memory_plans_for_the_datasets_resolution_and_batch(inputs, tmp_path):
    small = t.plan_memory(11.6 * GIB, "cuda", resolution=(512, 512))
    large = t.plan_memory(11.6 * GIB, "cuda", resolution=(1024, 1024), batch_size=2)
    assert (small.fields["blocks_to_swap"] or 0) < (large.fields["blocks_to_swap"] or 0)
    assert "512x512, batch 1" in small.text() and "1024x1024, batch 2" in large.text()


MODELS_FIELDS = FILES | {"train_data_dir": "-", "mixed_precision": "bf16"}


def test_auto_memory_above_the_table_and_on_the_cpu():
    big = t.plan_memory(80 * GIB, "cuda")
    assert big.row is None and not big.fields["fp8_base"] and "bf16 base" in big.text()
    cpu = t.plan_memory(64 * GIB, "cpu")
    assert cpu.row is None and "CPU" in cpu.text() and cpu.fields["blocks_to_swap"] is None
    tiny = t.plan_memory(4 * GIB, "cuda")
    assert tiny.row == 8 and "below its smallest row" in tiny.text() and "MORE than is free" in tiny.text()


# ------------------------------------------------------------------------------------------ train

def test_train_widgets_build_on_the_recommended_config(inputs, tmp_path):
    plan = run(inputs, tmp_path, flow={**FLOW, "guidance_scale": 1.0}, max_train_steps=250, seed=7,
               save_every_n_steps=50, save_state=True, sample_every_n_steps=100, apply_t5_attn_mask=True,
               t5xxl_max_token_length=256, sample_prompts="a photo of sks --w 512 --h 512\n\n# skipped\nsecond",
               device="cpu")
    c = plan.config
    rec = t.recommended()
    flags, recommended_flags = c.flags(), rec.flags()
    for name in ("mixed_precision", "gradient_checkpointing", "save_precision", "cache_latents",
                 "cache_text_encoder_outputs", "learning_rate"):
        assert flags[name] == recommended_flags[name], name
    assert c.flow == rec.flow and c.network == rec.network
    assert (c.run.max_train_steps, c.run.seed, c.saving.save_every_n_steps, c.saving.save_state,
            c.previews.sample_every_n_steps, c.models.apply_t5_attn_mask, c.models.t5xxl_max_token_length,
            c.memory.device, c.saving.output_name) == (250, 7, 50, True, 100, True, 256, "cpu", "lora")
    assert c.saving.output_dir == str(tmp_path / "out" / "lora") and c.caching.cache_dir == str(tmp_path / "cache")
    assert c.previews.sample_prompts is None  # no file is written for the core to read back: the lines are config
    assert c.previews.sample_prompt_lines == ("a photo of sks --w 512 --h 512", "second")
    assert {name: flags[name] for name in FILES} == FILES
    zero = run(inputs, tmp_path).config
    assert (zero.run.seed, zero.saving.save_every_n_steps, zero.run.max_train_epochs,
            zero.models.t5xxl_max_token_length, zero.previews.sample_prompts) == (None, None, None, None, None)
    assert zero.previews.sample_prompt_lines == () and not zero.previews.given


def test_pieces_reach_the_train_config(inputs, tmp_path):
    network = t.network_fields(network_dim=32, network_alpha=32.0, train_single_block_indices="0-9")
    optimizer, _ = t.optimizer_fields(optimizer_type="Adafactor", learning_rate=3e-4, lr_scheduler="constant")
    memory = t.memory_fields(gradient_checkpointing=True, latent_cache="disk", text_cache="off",
                             cache_beside_images=True)
    plan = run(inputs, tmp_path, network=network, optimizer=optimizer, memory=memory, max_train_epochs=3,
               models=t.ModelFiles(MODELS.models, fp8_base=True, t5xxl_fp8=True))
    c = plan.config
    assert c.network.network_dim == 32 and c.network.train_single_block_indices == "0-9"
    assert (c.optimizer.optimizer_type, c.optimizer.learning_rate, c.optimizer.optimizer_args) == (
        "Adafactor", 3e-4, config.ADAFACTOR_RECOMMENDED_ARGS)
    assert c.caching.cache_latents_to_disk and not c.caching.cache_text_encoder_outputs
    assert c.memory.fp8_base and c.run.max_train_epochs == 3
    assert c.caching.cache_dir is None  # sd-scripts' side-by-side caches, asked for
    assert c.memory.t5xxl_fp8
    assert plan.notes == tuple(c.advice())  # nothing was overridden


def test_auto_memory_is_planned_from_the_free_memory(inputs, tmp_path):
    memory = t.memory_fields(mode="auto", gradient_checkpointing=False)
    plan = run(inputs, tmp_path, memory=memory, free_memory=23.5 * GIB)
    assert plan.memory.row == 24 and plan.config.memory.fp8_base and plan.config.memory.gradient_checkpointing
    assert any("24 GB row" in n for n in plan.notes)
    with pytest.raises(ConfigError, match="free memory is unknown"):
        run(inputs, tmp_path, memory=memory)
    # at 11.6 GiB FLUX.1-dev needs blocks swapped; the transformer the models node picked may be smaller
    from trainer.config.memory_plan import TransformerSize
    from trainer.models.tiny import TINY_FLUX

    dev = run(inputs, tmp_path, memory=memory, free_memory=11.6 * GIB).config
    small = run(inputs, tmp_path, memory=memory, free_memory=11.6 * GIB,
                transformer=TransformerSize.of(TINY_FLUX)).config
    assert dev.memory.fp8_base and dev.memory.blocks_to_swap and dev.memory.t5xxl_fp8
    assert not small.memory.fp8_base and not small.memory.blocks_to_swap


def test_default_caches_give_way_to_random_captions_and_crops(inputs, tmp_path):
    shuffled = (dataset(inputs, shuffle_caption=True, random_crop=True),)
    plan = run(inputs, tmp_path, datasets=shuffled)
    assert not plan.config.caching.cache_latents and not plan.config.caching.cache_text_encoder_outputs
    assert any("random_crop" in n for n in plan.notes) and any("captions every step" in n for n in plan.notes)
    chosen = t.memory_fields(gradient_checkpointing=True, latent_cache="memory", text_cache="memory")
    kept = run(inputs, tmp_path, datasets=shuffled, memory=chosen).config  # the user's choice: the core will say
    assert kept.caching.cache_latents and kept.caching.cache_text_encoder_outputs
    in_extra = run(inputs, tmp_path, datasets=shuffled, extra_options="--cache_latents").config  # chosen there
    assert in_extra.caching.cache_latents and not in_extra.caching.cache_text_encoder_outputs


def test_extra_options_reach_flow_and_train_fields_but_not_files(inputs, tmp_path):
    plan = run(inputs, tmp_path, extra_options="--weighting_scheme logit_normal --logit_mean -0.5\n"
                                               "--loss_type huber --huber_schedule constant\n"
                                               "--save_last_n_steps 2 --sample_at_first --mixed_precision fp16")
    c = plan.config
    assert (c.flow.weighting_scheme, c.flow.logit_mean, c.flow.loss_type, c.flow.huber_schedule) == \
        ("logit_normal", -0.5, "huber", "constant")
    assert (c.saving.save_last_n_steps, c.previews.sample_at_first, c.memory.mixed_precision) == (2, True, "fp16")
    assert any("fp16" in n for n in plan.notes)  # the core's advice, said on the node
    for hostile, message in (("--output_dir /tmp", "extra_options: --output_dir is set by the train node"),
                             ("--output_d /tmp", "extra_options: --output_d is not a training option"),
                             ("--model_type chroma", "extra_options: --model_type is set by the models node"),
                             ("--network_args split_qkv=True", "extra_options: --network_args is set by the "
                                                               "network node"),
                             ("--xformers", "extra_options: --xformers is not a training option"),
                             ("--resume /x", "extra_options: --resume is set by the train node"),
                             ("-h", "extra_options: -h: write options in full"),
                             ("--check_only", "extra_options: --check_only is not a training option"),
                             ("--network_dim 8", "extra_options: --network_dim is set by the network node"),
                             ("--huber_c", "extra_options: .*expected one argument"),
                             ("--seed abc", "extra_options: .*invalid int value"),
                             ("--loss_type l3", "loss_type: expected one of l1, l2, huber, smooth_l1, not 'l3'")):
        with pytest.raises(ConfigError, match=message):
            run(inputs, tmp_path, extra_options=hostile)


@pytest.mark.parametrize("kwargs, message", [
    ({"flow": {**FLOW, "timestep_sampling": "logit"}}, "timestep_sampling: expected one of"),
    ({"flow": {**FLOW, "loss_type": "huber"}}, "huber_schedule 'snr' needs an SNR"),
    ({"max_train_steps": 0}, "max_train_steps: expected a positive whole number"),
    ({"t5xxl_max_token_length": 600}, "t5xxl_max_token_length: expected 1-512"),
    ({"datasets": ()}, "connect a dataset node"),
    ({"models": t.ModelFiles(MODELS.models, fp8_base=True), "extra_options": "--mixed_precision no"},
     "fp8_base needs"),
    ({"optimizer": {"optimizer_type": "AdamW"}}, "optimizer: expected the optimizer node's output"),
    ({"models": FILES}, "models: expected the models node's output"),
])
def test_bad_train_widgets_give_the_cores_message(inputs, tmp_path, kwargs, message):
    if "datasets" in kwargs:
        with pytest.raises(TrainerError, match=message):
            t.train_config(models=MODELS, flow=FLOW, max_train_steps=1, output_dir=tmp_path, output_name="x",
                           cache_dir=None, **kwargs)
        return
    with pytest.raises(TrainerError, match=message):
        run(inputs, tmp_path, **kwargs)

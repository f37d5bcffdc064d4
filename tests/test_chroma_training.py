"""Training a Chroma LoRA (--model_type chroma, sd-scripts' flux_train_network.py): from the command line without
--clip_l, from the library and from the nodes' config; the LoRA in sd-scripts' key layout with its Chroma metadata;
previews with guidance 0 and the T5 mask; text-encoder caches that never feed the other family; the memory plan's
sizes; a file that is not what --model_type says refused naming the right one. Tiny models in the real layouts."""

import dataclasses

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.cli import main
from trainer.config import TrainConfig
from trainer.config.memory_plan import TransformerSize, plan_memory
from trainer.errors import ConfigError, ModelFileError
from trainer.events import SilentReporter
from trainer.flow import FlowConfig
from trainer.loop import train
from trainer.lora import LoRAConfig, lora_metadata
from trainer.models import load_autoencoder, load_clip_l, load_t5xxl
from trainer.models.chroma import Chroma, ChromaParams, NoClipL
from trainer.models.tiny import TINY_FLUX
from trainer.models.tiny_chroma import TINY_CHROMA, write_chroma
from trainer.preflight import check
from trainer.sampling import SamplePrompt, generate, parse_prompt_line

from trainspace import cli_args, config, make_workspace

GIB = 2**30
# sd-scripts' lora_flux on Chroma: every Linear of the double and single blocks (Chroma's have no modulation Linear)
DOUBLE_LAYERS = ("img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
                 "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2")
SD_SCRIPTS_MODULES = (
    {f"lora_unet_double_blocks_{i}_{name}" for i in range(TINY_CHROMA.depth) for name in DOUBLE_LAYERS}
    | {f"lora_unet_single_blocks_{i}_linear{j}" for i in range(TINY_CHROMA.depth_single_blocks) for j in (1, 2)})
SD_SCRIPTS_KEYS = {f"{module}.{part}" for module in SD_SCRIPTS_MODULES
                   for part in ("lora_down.weight", "lora_up.weight", "alpha")}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("ws"))
    return {**ws, "chroma": write_chroma(ws["flux"].parent / "chroma.safetensors")}


def chroma_config(ws, tokenizer_dirs, out, **overrides) -> TrainConfig:
    values = dict(pretrained_model_name_or_path=str(ws["chroma"]), clip_l=None, model_type="chroma",
                  flow=FlowConfig(guidance_scale=0.0, model_prediction_type="raw", timestep_sampling="flux_shift"),
                  max_train_steps=3)
    return config(ws, tokenizer_dirs, out, **{**values, **overrides})


def chroma_args(ws, tokenizer_dirs, out) -> list[str]:
    """The FLUX command line with the Chroma file and without --clip_l."""
    args = cli_args(ws, tokenizer_dirs, out)
    i = args.index("--clip_l")
    del args[i:i + 2]
    args[args.index("--pretrained_model_name_or_path") + 1] = str(ws["chroma"])
    return args + ["--model_type", "chroma"]


def metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def assert_a_trained_sd_scripts_chroma_lora(path):
    weights = load_file(path)
    assert set(weights) == SD_SCRIPTS_KEYS
    assert all(weights[f"{m}.lora_up.weight"].abs().max() > 0 for m in SD_SCRIPTS_MODULES)  # each up starts at 0
    meta = metadata(path)
    assert (meta["ss_model_type"], meta["ss_base_model_version"]) == ("chroma", "chroma")
    assert meta["modelspec.architecture"] == "chroma/lora"
    assert meta["modelspec.implementation"] == "https://huggingface.co/lodestones/Chroma"
    assert meta["ss_apply_t5_attn_mask"] == "True"  # sd-scripts writes str(True)
    return meta


# ------------------------------------------------------------------------------------------- training

def test_the_library_trains_a_chroma_lora_in_sd_scripts_layout(ws, tokenizer_dirs, tmp_path):
    cfg = chroma_config(ws, tokenizer_dirs, tmp_path)
    assert cfg.models.apply_t5_attn_mask  # sd-scripts requires the mask for Chroma: turned on, not left off
    finished = train(cfg, SilentReporter())
    assert finished.steps == 3 and all(np.isfinite(finished.losses))
    meta = assert_a_trained_sd_scripts_chroma_lora(finished.lora)
    assert meta["ss_guidance_scale"] == "0.0"


def test_text_encoder_training_asked_for_trains_no_clip_layers_on_chroma(ws, tokenizer_dirs, tmp_path):
    """sd-scripts: train_clip_l = not network_train_unet_only and the model uses CLIP-L; Chroma has none."""
    cfg = chroma_config(ws, tokenizer_dirs, tmp_path, cache_text_encoder_outputs=False, max_train_steps=2,
                        network=LoRAConfig(network_dim=4, network_alpha=4, network_train_unet_only=False))
    weights = load_file(train(cfg, SilentReporter()).lora)
    assert {k for k in weights if not k.startswith("lora_unet_")} == set()


def test_the_command_line_trains_chroma_without_clip_l(ws, tokenizer_dirs, tmp_path, capsys):
    args = chroma_args(ws, tokenizer_dirs, tmp_path) + ["--network_dim", "4", "--max_train_steps", "2",
                                                        "--learning_rate", "2e-3", "--output_name", "chroma"]
    assert main(args + ["--check_only"]) == 0, capsys.readouterr().err
    assert main(args) == 0, capsys.readouterr().err
    said = capsys.readouterr()
    assert "--apply_t5_attn_mask is on" in said.out + said.err and "--guidance_scale 0.0" in said.out + said.err
    meta = assert_a_trained_sd_scripts_chroma_lora(tmp_path / "chroma.safetensors")
    assert meta["ss_guidance_scale"] == "0.0"


def test_an_explicit_guidance_scale_is_kept_for_chroma(ws, tokenizer_dirs, tmp_path):
    from trainer.cli import config_from_args, parse_command_line

    warned = []
    cfg = config_from_args(parse_command_line(chroma_args(ws, tokenizer_dirs, tmp_path) + ["--guidance_scale", "2"]),
                           warn=warned.append)
    assert cfg.flow.guidance_scale == 2.0 and cfg.models.model_type == "chroma" and cfg.models.clip_l is None
    assert not any("guidance_scale" in line for line in warned)  # said once, by the advice every front end gives
    assert "guidance_scale 2.0 is used as given; Chroma is trained with 0.0 (sd-scripts' guide)" in cfg.advice()


def test_flux_still_needs_clip_l_and_says_so(ws, tokenizer_dirs, tmp_path, capsys):
    args = cli_args(ws, tokenizer_dirs, tmp_path)
    i = args.index("--clip_l")
    assert main(args[:i] + args[i + 2:] + ["--check_only"]) == 2
    assert "clip_l: a model file is required (only --model_type chroma does without CLIP-L)" in capsys.readouterr().err


@pytest.mark.parametrize("file,model_type,found", [("chroma", None, "chroma"), ("flux", "chroma", "flux")])
def test_a_file_that_is_not_what_model_type_says_is_refused_naming_the_right_one(ws, tokenizer_dirs, tmp_path,
                                                                                   capsys, file, model_type, found):
    args = cli_args(ws, tokenizer_dirs, tmp_path)
    args[args.index("--pretrained_model_name_or_path") + 1] = str(ws[file])
    args += ["--model_type", model_type] if model_type else []
    assert main(args + ["--check_only"]) == 2
    assert f"set --model_type {found}" in capsys.readouterr().err
    cfg = config(ws, tokenizer_dirs, tmp_path, pretrained_model_name_or_path=str(ws[file]),
                 model_type=model_type or "flux")
    with pytest.raises(ModelFileError, match=f"set --model_type {found}"):
        train(cfg, SilentReporter())  # the library refuses before loading anything as well
    assert not (tmp_path / "test_lora.safetensors").exists()


def test_the_preflight_plans_the_chroma_network_and_skips_clip_l(ws, tokenizer_dirs, tmp_path):
    check(chroma_config(ws, tokenizer_dirs, tmp_path))
    check(chroma_config(ws, tokenizer_dirs, tmp_path, clip_l=str(ws["ae"])))  # given, but never read for Chroma


def test_an_unknown_model_type_is_refused():
    with pytest.raises(ConfigError, match="model_type: expected one of flux, chroma, not 'sd3'"):
        TrainConfig.from_flags(pretrained_model_name_or_path="m", t5xxl="t", ae="a", train_data_dir="d",
                               model_type="sd3")


# ------------------------------------------------------------------------------------------- previews

def test_chroma_previews_use_guidance_0_without_g_and_the_t5_mask(ws, tokenizer_dirs, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 2 --d 5\na blue square --w 32 --h 32 --s 2 --g 2.5\n")
    seen = []
    forward = Chroma.forward

    def recording(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # previews run under no_grad; training steps do not
            guidance, mask = args[6], args[7]
            seen.append((float(guidance[0]), mask is not None))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Chroma, "forward", recording)
    cfg = chroma_config(ws, tokenizer_dirs, tmp_path, max_train_steps=1, sample_prompts=str(prompts),
                        sample_at_end=True)
    train(cfg, SilentReporter())
    assert sorted(set(seen)) == [(0.0, True), (2.5, True)]  # the prompt's --g, else 0 (not FLUX's 3.5)
    assert len(list((tmp_path / "sample").glob("*.png"))) == 2


def test_preview_guidance_without_g_is_the_models():
    from trainer.sampling import preview_guidance

    plain, given = parse_prompt_line("a cat"), parse_prompt_line("a cat --g 4")
    assert (preview_guidance(plain, TINY_CHROMA), preview_guidance(given, TINY_CHROMA)) == (0.0, 4.0)
    assert (preview_guidance(plain, TINY_FLUX), preview_guidance(given, TINY_FLUX)) == (3.5, 4.0)
    assert preview_guidance(SamplePrompt("built in code", guidance=2.0), TINY_CHROMA) == 2.0


def test_generate_gives_a_chroma_model_guidance_0(ws):
    ae = load_autoencoder(ws["ae"], dtype=torch.float32)
    model = Chroma(TINY_CHROMA)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(float(args[6][0])))
    cond = (torch.zeros(1, 0), torch.randn(1, 4, TINY_CHROMA.context_in_dim), torch.ones(1, 4))
    generate(model, ae, cond, parse_prompt_line("x --w 32 --h 32 --s 2"))
    assert seen == [0.0, 0.0]


# ------------------------------------------------------------------------------------------- caches

def test_text_encoder_caches_for_chroma_and_flux_do_not_mix(ws, tokenizer_dirs, tmp_path):
    from trainer.data import FluxDataset, cache_text_outputs, single_folder_dataset
    from trainer.data.dataset import DatasetGroup

    from datagen import rgb

    for i in range(2):
        rgb(tmp_path / f"img{i}.png", 64, 64, caption=f"caption {i}", seed=i)

    def group():
        return DatasetGroup([FluxDataset(single_folder_dataset(tmp_path, 64, caption_extension=".txt"))])

    clip = load_clip_l(ws["clip_l"], dtype=torch.float32, tokenizer=tokenizer_dirs["clip_l"])
    t5 = load_t5xxl(ws["t5xxl"], dtype=torch.float32, tokenizer=tokenizer_dirs["t5xxl"], max_length=16)
    cached = group()
    assert cache_text_outputs(cached, NoClipL(), t5, True, apply_t5_attn_mask=True)["encoded"] == 2
    assert cached.datasets[0].batch(0).text[0].shape == (1, 0)  # Chroma's pooled vector: empty
    assert cache_text_outputs(group(), NoClipL(), t5, True, apply_t5_attn_mask=True)["reused"] == 2
    flux = group()
    assert cache_text_outputs(flux, clip, t5, True, apply_t5_attn_mask=True) == {"encoded": 2, "reused": 0}
    assert flux.datasets[0].batch(0).text[0].shape == (1, 64)  # CLIP-L's, not the Chroma file's empty one
    assert cache_text_outputs(group(), NoClipL(), t5, True, apply_t5_attn_mask=True)["encoded"] == 2


# ------------------------------------------------------------------------------------------- nodes

def test_the_node_path_builds_a_chroma_config(ws, tmp_path):
    from packimport import pack

    t = pack("nodes.translate")
    models = t.ModelFiles(pack("trainer.config.sections").ModelsConfig(  # what the models node gives for Chroma
        pretrained_model_name_or_path=str(ws["chroma"]), t5xxl=str(ws["t5xxl"]), ae=str(ws["ae"]), model_type="chroma"))
    flow = {"timestep_sampling": "flux_shift", "discrete_flow_shift": 3.0, "sigmoid_scale": 1.0,
            "model_prediction_type": "raw", "guidance_scale": t.recommended().flow.guidance_scale, "loss_type": "l2"}
    toml = t.toml_datasets("", ws["toml"].read_text(), tmp_path)
    common = dict(models=models, datasets=tuple(toml), flow=flow, max_train_steps=2, output_dir=tmp_path / "out",
                  output_name="lora", cache_dir=tmp_path / "cache")
    plan = t.train_config(**common)
    c = plan.config
    models = c.models
    assert (models.model_type, models.clip_l, models.apply_t5_attn_mask, c.flow.guidance_scale) == (
        "chroma", None, True, 0.0)
    assert any("--apply_t5_attn_mask is on" in n for n in plan.notes)
    assert t.train_config(**common, extra_options="--guidance_scale 2").config.flow.guidance_scale == 2.0
    assert t.train_config(**{**common, "flow": {**flow, "guidance_scale": 0.5}}).config.flow.guidance_scale == 0.5
    pack("trainer.preflight").check(c)


# ------------------------------------------------------------------------------------------- memory plan

def test_the_memory_plan_sizes_chroma_from_its_layers():
    with torch.device("meta"):
        model = Chroma(TINY_CHROMA)
    assert TransformerSize.of(TINY_CHROMA).total == sum(p.numel() for p in model.parameters())
    chroma = TransformerSize.of(ChromaParams())
    assert chroma.total == 8_899_983_424 and (chroma.double_count, chroma.single_count) == (19, 38)
    assert dataclasses.astuple(chroma) == (226_548_224, 113_271_040, 19, 38, 291_267_648)
    from trainer.config.memory_plan import CHROMA_1

    assert chroma == CHROMA_1


def test_chroma_needs_fewer_swapped_blocks_than_flux_dev_on_the_same_card():
    from trainer.config.memory_plan import FLUX_DEV

    chroma = TransformerSize.of(ChromaParams())
    for free in (10, 12, 16):
        flux_plan = plan_memory(free * GIB, size=FLUX_DEV)
        chroma_plan = plan_memory(free * GIB, size=chroma)
        assert chroma_plan.estimate_gib < flux_plan.estimate_gib or \
            (chroma_plan.fields["blocks_to_swap"] or 0) < (flux_plan.fields["blocks_to_swap"] or 0)
    assert plan_memory(16 * GIB, size=chroma).fields["blocks_to_swap"] is None  # fp8 Chroma fits 16 GiB unswapped


def test_memory_auto_on_the_command_line_reads_chroma(ws, tokenizer_dirs, tmp_path, capsys):
    assert main(chroma_args(ws, tokenizer_dirs, tmp_path) + ["--memory", "auto", "--check_only"]) == 0, \
        capsys.readouterr().err


def test_lora_metadata_names_chroma_as_sd_scripts_does():
    meta = lora_metadata(LoRAConfig(), "chroma", timestamp=0.0)
    assert (meta["ss_model_type"], meta["ss_base_model_version"], meta["modelspec.architecture"],
            meta["modelspec.implementation"]) == ("chroma", "chroma", "chroma/lora",
                                                  "https://huggingface.co/lodestones/Chroma")
    dev = lora_metadata(LoRAConfig(), "dev", timestamp=0.0)
    assert (dev["ss_model_type"], dev["ss_base_model_version"], dev["modelspec.architecture"]) == \
        ("flux", "flux1", "flux-1-dev/lora")

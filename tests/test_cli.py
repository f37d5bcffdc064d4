"""The flux_train_network command line: the seed guide's command runs as written (tiny files), every option
family reaches the code it controls, bad combinations are named."""


import pytest
import torch
from safetensors import safe_open

from trainer.cli import build_parser, config_from_args, main

from trainspace import cli_args, make_workspace

SEED_GUIDE = ["--network_module=networks.lora_flux", "--network_dim=16", "--network_alpha=1", "--learning_rate=1e-4",
              "--optimizer_type=AdamW8bit", "--lr_scheduler=constant", "--sdpa", "--max_train_epochs=2",
              "--save_every_n_epochs=1", "--mixed_precision=fp16", "--gradient_checkpointing", "--guidance_scale=1.0",
              "--timestep_sampling=flux_shift", "--model_prediction_type=raw", "--blocks_to_swap=2",
              "--cache_text_encoder_outputs", "--cache_latents", "--save_model_as=safetensors",
              "--output_name=my_flux_lora"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def parse(ws, tokenizer_dirs, tmp_path, *extra):
    return config_from_args(build_parser().parse_args(cli_args(ws, tokenizer_dirs, tmp_path) + list(extra)),
                            warn=lambda text: None)


def test_seed_guide_command_line_runs_end_to_end(ws, tokenizer_dirs, tmp_path, capsys):
    assert main(cli_args(ws, tokenizer_dirs, tmp_path) + SEED_GUIDE) == 0
    out = capsys.readouterr().out
    assert "block swap: 1 double + 1 single blocks stream" in out and "saves no memory" in out
    assert ((tmp_path / "my_flux_lora.safetensors").is_file()
            and (tmp_path / "my_flux_lora-000001.safetensors").is_file())
    with safe_open(str(tmp_path / "my_flux_lora.safetensors"), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert any(k.startswith("lora_te1_") for k in keys)  # CLIP-L trained: T5 outputs cached, CLIP run each step
    assert meta["ss_network_dim"] == "16" and meta["ss_mixed_precision"] == "fp16"
    assert meta["ss_optimizer"] == "AdamW8bit" and meta["ss_num_epochs"] == "2"


@pytest.mark.parametrize("extra,message", [
    (["--blocks_to_swap", "4", "--cpu_offload_checkpointing", "--gradient_checkpointing"], "cannot be used together"),
    (["--network_args", "train_t5xxl=True", "--cache_text_encoder_outputs"], "train_t5xxl"),
    (["--fp8_base"], "fp8_base needs --mixed_precision"),
    (["--loss_type", "huber"], "huber_schedule 'snr'"),
    (["--optimizer_type", "NoSuchOptimizer", "--max_train_steps", "1"], "optimizer_type 'NoSuchOptimizer' is unknown"),
    (["--save_model_as", "ckpt"], "only safetensors"),
    (["--network_module", "networks.lora"], "only networks.lora_flux"),
    (["--timestep_sampling", "logit"], "timestep_sampling: expected one of"),
    (["--network_args", "train_double_block_indices=0-40", "--max_train_steps", "1"], "out of range"),
    (["--blocks_to_swap", "40"], "blocks_to_swap: expected 0-35"),
    (["--full_bf16"], "full_bf16 needs --mixed_precision bf16"),
])
def test_invalid_combinations_give_clear_errors(ws, tokenizer_dirs, tmp_path, capsys, extra, message):
    assert main(cli_args(ws, tokenizer_dirs, tmp_path) + extra) == 2
    assert message in capsys.readouterr().err


def test_missing_data_and_bad_files_are_named(tokenizer_dirs, tmp_path, capsys, ws):
    args = cli_args(ws, tokenizer_dirs, tmp_path)
    i = args.index("--dataset_config")
    assert main(args[:i] + args[i + 2:]) == 2
    assert "no training data" in capsys.readouterr().err
    bad = list(args)
    bad[bad.index("--ae") + 1] = str(ws["clip_l"])
    assert main(bad + ["--max_train_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert str(ws["clip_l"]) in err and "expected the FLUX autoencoder" in err


def test_options_that_do_not_apply_warn(ws, tokenizer_dirs, tmp_path):
    warnings = []
    ns = build_parser().parse_args(cli_args(ws, tokenizer_dirs, tmp_path) + ["--v2", "--clip_skip", "2",
                                                                              "--max_token_length", "225",
                                                                              "--split_mode"])
    config = config_from_args(ns, warn=warnings.append)
    assert any("--v2" in w for w in warnings) and any("--clip_skip" in w for w in warnings)
    assert any("--max_token_length" in w for w in warnings)
    assert any("split_mode is deprecated" in w for w in warnings) and config.memory.blocks_to_swap == 18


def test_sd_scripts_defaults(ws, tokenizer_dirs, tmp_path):
    c = parse(ws, tokenizer_dirs, tmp_path)
    assert (c.flow.guidance_scale, c.flow.timestep_sampling,
            c.flow.model_prediction_type) == (3.5, "sigma", "sigma_scaled")
    assert (c.flow.discrete_flow_shift, c.flow.weighting_scheme, c.flow.loss_type) == (3.0, "uniform", "l2")
    o = c.optimizer
    assert (c.network.network_dim, c.network.network_alpha, o.learning_rate) == (4, 1.0, 2e-6)
    assert (c.run.max_train_steps, o.max_grad_norm, o.lr_scheduler, c.memory.mixed_precision) == (
        1600, 1.0, "constant", "no")
    assert c.data.caption_extension == ".caption" and o.optimizer_type == ""


def test_option_families_map_to_the_config(ws, tokenizer_dirs, tmp_path):
    c = parse(ws, tokenizer_dirs, tmp_path, "--timestep_sampling", "shift", "--discrete_flow_shift", "3.1582",
              "--sigmoid_scale", "2", "--weighting_scheme", "logit_normal", "--logit_mean", "0.3", "--logit_std", "1.2",
              "--mode_scale", "1.1", "--loss_type", "smooth_l1", "--huber_schedule", "exponential", "--huber_c", "0.2",
              "--huber_scale", "1.5", "--apply_t5_attn_mask", "--t5xxl_max_token_length", "256",
              "--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
              "--lr_scheduler", "cosine_with_restarts", "--lr_warmup_steps", "0.1", "--lr_scheduler_num_cycles", "3",
              "--text_encoder_lr", "1e-5", "2e-5", "--unet_lr", "3e-4", "--network_args", "img_attn_dim=8",
              "--gradient_accumulation_steps", "4", "--save_every_n_steps", "50", "--save_state",
              "--mixed_precision", "bf16", "--full_bf16", "--save_precision", "bf16", "--seed", "9",
              "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only")
    f = c.flow
    assert (f.timestep_sampling, f.discrete_flow_shift, f.sigmoid_scale) == ("shift", 3.1582, 2.0)
    assert (f.weighting_scheme, f.logit_mean, f.logit_std, f.mode_scale) == ("logit_normal", 0.3, 1.2, 1.1)
    assert (f.loss_type, f.huber_schedule, f.huber_c, f.huber_scale) == ("smooth_l1", "exponential", 0.2, 1.5)
    assert c.models.apply_t5_attn_mask and c.models.t5xxl_max_token_length == 256
    o = c.optimizer
    assert o.optimizer_type == "Adafactor" and o.optimizer_args == ("relative_step=False", "scale_parameter=False")
    assert o.lr_scheduler == "cosine_with_restarts" and o.lr_warmup_steps == 0.1 and o.lr_scheduler_num_cycles == 3
    assert o.text_encoder_lr == (1e-5, 2e-5) and o.unet_lr == 3e-4 and c.network.img_attn_dim == 8
    assert o.gradient_accumulation_steps == 4 and c.saving.save_every_n_steps == 50 and c.saving.save_state
    assert c.memory.full_bf16 and c.saving.save_precision == "bf16" and c.run.seed == 9
    assert c.caching.cache_latents and c.caching.cache_text_encoder_outputs  # the _to_disk forms imply them


def run_with_spies(ws, tokenizer_dirs, tmp_path, monkeypatch, *extra):
    """Run two steps through the CLI, recording what reached the flux forward and the flow functions."""
    from trainer import flow
    from trainer.memory import CheckpointedRunner
    from trainer.models.flux import Flux

    seen = {"sigmas": [], "loss": [], "forward": []}
    original_sigmas, original_loss, original_forward = flow.sample_sigmas, flow.elementwise_loss, Flux.forward

    def sigmas(cfg, *args):
        seen["sigmas"].append(cfg)
        return original_sigmas(cfg, *args)

    def loss(prediction, target, loss_type, c=None):
        seen["loss"].append((loss_type, c))
        return original_loss(prediction, target, loss_type, c)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, txt_attention_mask=None):
        seen["forward"].append(dict(dtype=self.img_in.weight.dtype, guidance=guidance, mask=txt_attention_mask,
                                    txt=txt.shape, checkpointing=isinstance(self.block_runner, CheckpointedRunner),
                                    autocast=torch.is_autocast_enabled("cpu")))
        return original_forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance, txt_attention_mask)

    monkeypatch.setattr(flow, "sample_sigmas", sigmas)
    monkeypatch.setattr(flow, "elementwise_loss", loss)
    monkeypatch.setattr(Flux, "forward", forward)
    assert main(cli_args(ws, tokenizer_dirs, tmp_path) + ["--max_train_steps", "2", "--network_train_unet_only",
                                                          "--cache_latents",
                                                          "--cache_text_encoder_outputs"] + list(extra)) == 0
    return seen


def test_flow_options_reach_the_loss(ws, tokenizer_dirs, tmp_path, monkeypatch):
    seen = run_with_spies(ws, tokenizer_dirs, tmp_path, monkeypatch, "--timestep_sampling", "shift",
                          "--discrete_flow_shift", "5", "--loss_type", "huber", "--huber_schedule", "constant",
                          "--huber_c", "0.3", "--guidance_scale", "2.5", "--apply_t5_attn_mask")
    assert seen["sigmas"][0].timestep_sampling == "shift" and seen["sigmas"][0].discrete_flow_shift == 5.0
    loss_type, c = seen["loss"][0]
    assert loss_type == "huber" and torch.allclose(c, torch.full_like(c, 0.3))
    call = seen["forward"][0]
    assert torch.equal(call["guidance"], torch.full_like(call["guidance"], 2.5))
    assert call["mask"] is not None and call["txt"][1] == 16


def test_precision_and_checkpointing_reach_the_model(ws, tokenizer_dirs, tmp_path, monkeypatch):
    seen = run_with_spies(ws, tokenizer_dirs, tmp_path, monkeypatch, "--mixed_precision", "bf16",
                          "--gradient_checkpointing", "--save_precision", "bf16")
    call = seen["forward"][0]
    assert call["dtype"] == torch.bfloat16 and call["checkpointing"] and call["autocast"] and call["mask"] is None
    with safe_open(str(tmp_path / "last.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_fp8_base_keeps_block_weights_in_fp8(ws, tokenizer_dirs, tmp_path, monkeypatch):
    from trainer import session as session_module

    captured = {}
    original = session_module.prepare

    def prepare(*args, **kwargs):
        s = original(*args, **kwargs)
        captured["weight"] = s.flux.double_blocks[0].img_attn.qkv.weight.dtype
        captured["optimizer"] = type(s.optimizer).__name__
        captured["scheduler_lrs"] = [s.scheduler.lr_lambdas[0](i) for i in range(4)]
        return s

    original_t5 = session_module.load_t5xxl

    def load_t5xxl(*args, **kwargs):
        t5 = original_t5(*args, **kwargs)
        captured["t5"] = t5.model.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.dtype
        return t5

    monkeypatch.setattr(session_module, "load_t5xxl", load_t5xxl)
    import trainer.loop as loop_module

    monkeypatch.setattr(loop_module, "prepare", prepare)  # the loop's own name: the one it calls
    assert main(cli_args(ws, tokenizer_dirs, tmp_path) + ["--max_train_steps", "4", "--fp8_base", "--mixed_precision",
                                                          "bf16", "--network_train_unet_only", "--optimizer_type",
                                                          "Lion", "--lr_scheduler", "linear",
                                                          "--lr_warmup_steps", "2", "--t5xxl_fp8"]) == 0
    assert set(captured) == {"weight", "optimizer", "scheduler_lrs", "t5"}  # both spies ran
    assert captured["weight"] == torch.float8_e4m3fn and captured["optimizer"] == "Lion"
    assert captured["t5"] == torch.float8_e4m3fn  # --t5xxl_fp8: T5 stays in fp8 while it encodes
    assert captured["scheduler_lrs"] == [0.0, 0.5, 1.0, 0.5]


def test_sample_prompts_write_pngs_named_like_sd_scripts(ws, tokenizer_dirs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red circle --w 64 --h 48 --d 5 --s 3 --g 2.0\n"
                       "blue square --n ugly --l 2.0 --s 2 --w 32 --h 32\n")
    assert main(cli_args(ws, tokenizer_dirs, tmp_path) + ["--max_train_steps", "2", "--sample_prompts", str(prompts),
                                                          "--sample_every_n_steps", "1", "--output_name", "pics",
                                                          "--network_train_unet_only", "--seed", "11"]) == 0
    names = sorted(p.name for p in (tmp_path / "sample").iterdir())
    assert len(names) == 4
    first = [n for n in names if n.startswith("pics_000001_00_")][0]
    assert first.endswith("_5.png")  # prompt seed from --d
    second = [n for n in names if n.startswith("pics_000001_01_")][0]
    assert second.endswith("_12.png")  # no --d: run seed + prompt index
    from PIL import Image

    assert Image.open(tmp_path / "sample" / first).size == (64, 48)


def test_learning_rates_and_grad_clipping_reach_the_optimizer(ws, tokenizer_dirs, tmp_path, monkeypatch):
    import trainer.loop as loop_module

    clipped, groups = [], {}
    original_prepare = loop_module.prepare

    def spy(original):  # the loop clips with the norm it already has, or computes it (either way, one call a step)
        def clip(params, max_norm, *args, **kwargs):
            clipped.append(max_norm)
            return original(params, max_norm, *args, **kwargs)
        return clip

    def prepare(*args, **kwargs):
        s = original_prepare(*args, **kwargs)
        groups.update({g["name"]: g["lr"] for g in s.optimizer.param_groups})
        return s

    for name in ("clip_grad_norm_", "clip_grads_with_norm_"):
        monkeypatch.setattr(torch.nn.utils, name, spy(getattr(torch.nn.utils, name)))
    monkeypatch.setattr(loop_module, "prepare", prepare)
    assert main(cli_args(ws, tokenizer_dirs, tmp_path) + [
        "--max_train_steps", "2", "--learning_rate", "1e-4", "--unet_lr", "3e-4", "--text_encoder_lr", "2e-5",
        "--max_grad_norm", "0.25", "--network_args", "loraplus_lr_ratio=4"]) == 0
    assert groups == {"lora_unet": 3e-4, "lora_unet plus": pytest.approx(12e-4), "lora_te1": 2e-5,
                      "lora_te1 plus": pytest.approx(8e-5)}
    assert clipped == [0.25, 0.25]
    assert main(cli_args(ws, tokenizer_dirs, tmp_path) + ["--max_train_steps", "1", "--max_grad_norm", "0",
                                                          "--network_train_unet_only"]) == 0
    assert clipped == [0.25, 0.25]  # 0 turns clipping off


def test_network_weights_continue_and_dim_from_weights(ws, tokenizer_dirs, tmp_path):
    from safetensors.torch import load_file

    first = tmp_path / "first"
    assert main(cli_args(ws, tokenizer_dirs, first) + ["--max_train_steps", "3", "--learning_rate", "2e-3",
                                                       "--network_dim", "6", "--network_train_unet_only"]) == 0
    trained = load_file(first / "last.safetensors")
    for extra in (["--network_dim", "6"], ["--dim_from_weights"]):
        out = tmp_path / extra[0].strip("-")
        assert main(cli_args(ws, tokenizer_dirs, out) + ["--max_train_steps", "1", "--learning_rate", "1e-12",
                                                         "--network_weights", str(first / "last.safetensors"),
                                                         "--network_train_unet_only"] + extra) == 0
        continued = load_file(out / "last.safetensors")
        assert continued.keys() == trained.keys()
        assert max((continued[k] - trained[k]).abs().max().item() for k in trained) < 1e-6
    assert main(cli_args(ws, tokenizer_dirs, tmp_path / "bad") + [
        "--max_train_steps", "1", "--network_weights", str(first / "last.safetensors"), "--network_dim", "4",
        "--network_train_unet_only"]) == 2


def test_train_data_dir_in_dreambooth_convention(tmp_path, ws, tokenizer_dirs):
    from trainer.distributed import World
    from trainer.session import dataset_configs

    from datagen import rgb

    rgb(tmp_path / "data" / "10_sks dog" / "a.png", 64, 64, caption=None)
    rgb(tmp_path / "data" / "1_dog" / "b.png", 64, 64, caption=None)
    (tmp_path / "data" / "notes").mkdir()
    args = cli_args(ws, tokenizer_dirs, tmp_path / "out")
    i = args.index("--dataset_config")
    c = config_from_args(build_parser().parse_args(args[:i] + args[i + 2:] + [
        "--train_data_dir", str(tmp_path / "data"), "--resolution", "64,64", "--train_batch_size", "3",
        "--enable_bucket", "--min_bucket_reso", "64"]), warn=lambda text: None)
    (dataset,) = dataset_configs(c, World(rank=0, size=2))
    assert [(s.num_repeats, s.class_tokens) for s in dataset.subsets] == [(10, "sks dog"), (1, "dog")]
    assert dataset.resolution == (64, 64) and dataset.enable_bucket and dataset.batch_size == 6  # 3 per process x 2


def test_ctrl_c_says_what_it_will_do_before_and_after_the_first_step():
    from trainer.console import ConsoleReporter
    from trainer.events import StepEnd

    reporter = ConsoleReporter(quiet=True)
    assert "no step has been trained yet, so no LoRA or training state will be saved" in reporter.stop_text()
    assert "will be saved" not in reporter.stop_text().replace("will be saved (caches", "")
    reporter.quiet = False
    reporter.emit(StepEnd(1, 4, 1, 0.5, 0.5, 1e-3, 1.0))
    reporter.end_progress()
    assert reporter.stop_text().startswith("stopping after this step; the LoRA and the training state will be saved")


def test_a_run_with_most_steps_skipped_says_so_and_fails(ws, tokenizer_dirs, tmp_path, monkeypatch, capsys):
    from trainer import flow

    original, calls = flow.batch_loss, []

    def nan_after_first(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) > 1 else loss

    monkeypatch.setattr(flow, "batch_loss", nan_after_first)
    argv = cli_args(ws, tokenizer_dirs, tmp_path) + ["--max_train_steps", "4", "--skip_nonfinite_steps", "100",
                                                    "--network_train_unet_only"]
    assert main(argv) == 3
    out = capsys.readouterr().out
    assert "3 of 4 steps were skipped (non-finite loss or gradients" in out and "learned from 1 step(s)" in out
    assert "most steps were skipped, so this run counts as failed (exit status 3)" in out
    calls.clear()
    monkeypatch.setattr(flow, "batch_loss", lambda *a, **k: (calls.append(1), original(*a, **k))[1] * (
        float("nan") if len(calls) == 2 else 1.0))
    assert main(argv + ["--output_name", "few"]) == 0  # one of four skipped: said, and the run succeeds
    out = capsys.readouterr().out
    assert "1 of 4 steps were skipped" in out and "counts as failed" not in out

"""sd-scripts' --config_file (the TOML the kohya_ss GUI writes) and --output_config, the guide's own command line on
tiny files, and the command-line-only options (logging, tokenizer cache, old spellings, dataset debugging)."""

import logging

import pytest
from safetensors import safe_open

from trainer.cli import main, parse_command_line

from trainspace import cli_args, make_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def gui_config(ws, tokenizers, out) -> str:
    """What the kohya_ss GUI saves for a FLUX LoRA: flat keys, strings for resolution, empty lists, GUI-only keys."""
    return f'''
pretrained_model_name_or_path = "{ws["flux"].as_posix()}"
clip_l = "{ws["clip_l"].as_posix()}"
t5xxl = "{ws["t5xxl"].as_posix()}"
ae = "{ws["ae"].as_posix()}"
clip_l_tokenizer = "{tokenizers["clip_l"].as_posix()}"
t5xxl_tokenizer = "{tokenizers["t5xxl"].as_posix()}"
t5xxl_max_token_length = 16
device = "cpu"
dataset_config = "{ws["toml"].as_posix()}"
output_dir = "{out.as_posix()}"
output_name = "gui_lora"
adaptive_noise_scale = 0
bucket_reso_steps = 64
cache_latents = true
cache_text_encoder_outputs = true
dynamo_backend = "no"
gradient_accumulation_steps = 1
gradient_checkpointing = true
guidance_scale = 1
huber_schedule = "snr"
learning_rate = 0.0003
loss_type = "l2"
lr_scheduler = "constant"
lr_scheduler_args = []
max_data_loader_n_workers = 0
max_train_steps = 3
mem_eff_attn = false
mixed_precision = "no"
model_prediction_type = "raw"
multires_noise_discount = 0.3
network_alpha = 4
network_args = [ "train_blocks=single",]
network_dim = 4
network_module = "networks.lora_flux"
noise_offset_type = "Original"
optimizer_args = []
optimizer_type = "AdamW"
resolution = "64,64"
save_model_as = "safetensors"
save_every_n_steps = 2
sdpa = true
seed = 42
text_encoder_lr = [ 0.0, 0.0,]
timestep_sampling = "sigmoid"
train_batch_size = 1
unet_lr = 0.0003
xformers = true

[extra_table]
network_train_unet_only = true
'''


def test_gui_config_file_trains_and_the_command_line_overrides_it(ws, tokenizer_dirs, tmp_path, capsys):
    config = tmp_path / "gui.toml"
    config.write_text(gui_config(ws, tokenizer_dirs, tmp_path))
    assert main(["--config_file", str(config), "--max_train_steps", "2"]) == 0
    captured = capsys.readouterr()
    with safe_open(str(tmp_path / "gui_lora.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["ss_steps"] == "2"  # the command line's 2, not the file's 3
    assert meta["ss_network_dim"] == "4" and meta["ss_seed"] == "42"
    assert keys and all(k.startswith("lora_unet_single_blocks_") for k in keys)  # network_args and a nested table
    assert "--xformers has no effect here" in captured.out
    assert "not options here, ignored: noise_offset_type" in captured.out  # a GUI-only key: named and skipped


def test_config_file_without_suffix_and_bad_files_are_named(tmp_path, capsys):
    bad = tmp_path / "broken.toml"
    bad.write_text("learning_rate = = 1\n")
    assert main(["--config_file", str(tmp_path / "broken")]) == 2  # sd-scripts adds .toml when missing
    err = capsys.readouterr().err
    assert "config_file" in err and "broken.toml" in err and "not valid TOML" in err
    assert main(["--config_file", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    typed = tmp_path / "typed.toml"
    typed.write_text("gradient_checkpointing = 'yes'\n")
    assert main(["--config_file", str(typed)]) == 2
    assert "'gradient_checkpointing' = 'yes': expected true or false" in capsys.readouterr().err


def test_output_config_writes_what_config_file_reads_back(ws, tokenizer_dirs, tmp_path):
    written = tmp_path / "saved.toml"
    argv = cli_args(ws, tokenizer_dirs, tmp_path) + ["--network_dim", "8", "--network_args", "split_qkv=True",
                                                    "--lr_warmup_steps", "10%", "--resolution", "64,48",
                                                    "--gradient_checkpointing"]
    assert main(argv + ["--config_file", str(written), "--output_config"]) == 0
    assert written.is_file() and not list(tmp_path.glob("*.tmp*"))
    again = vars(parse_command_line(["--config_file", str(written)]))
    original = vars(parse_command_line(argv))
    assert {k: v for k, v in again.items() if k != "config_file"} == original


def test_guide_command_line_runs_as_written(ws, tokenizer_dirs, tmp_path, capsys):
    """sd-scripts' FLUX.1 LoRA guide, word for word except the model and data paths and the CPU-sized settings."""
    guide = ("--cache_latents_to_disk --save_model_as safetensors --sdpa --persistent_data_loader_workers "
             "--max_data_loader_n_workers 2 --seed 42 --gradient_checkpointing --mixed_precision bf16 "
             "--save_precision bf16 --network_module networks.lora_flux --network_dim 4 --network_train_unet_only "
             "--optimizer_type adamw --learning_rate 1e-4 --cache_text_encoder_outputs "
             "--cache_text_encoder_outputs_to_disk --fp8_base --highvram --max_train_epochs 2 --save_every_n_epochs 1 "
             "--output_name flux-lora-name --timestep_sampling shift --discrete_flow_shift 3.1582 "
             "--model_prediction_type raw --guidance_scale 1.0").split()
    assert main(cli_args(ws, tokenizer_dirs, tmp_path) + guide) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "flux-lora-name.safetensors").is_file()
    assert (tmp_path / "flux-lora-name-000001.safetensors").is_file()
    assert "--highvram has no effect here" in out and "--max_data_loader_n_workers has no effect here" in out


def test_console_logging_options(ws, tokenizer_dirs, tmp_path):
    log_file = tmp_path / "run.log"
    argv = cli_args(ws, tokenizer_dirs, tmp_path) + ["--console_log_level", "INFO", "--console_log_file",
                                                    str(log_file), "--console_log_simple", "--check_only"]
    try:
        assert main(argv) == 0
        logging.getLogger("trainer.test").info("a line for the log file")
        for handler in logging.getLogger().handlers:
            handler.flush()
        assert logging.getLogger().level == logging.INFO
        assert log_file.read_text().splitlines()[-1] == "a line for the log file"  # simple: the message only
    finally:
        for handler in list(logging.getLogger().handlers):
            if isinstance(handler, logging.FileHandler):
                handler.close()
                logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(logging.WARNING)


def test_debug_dataset_prints_the_report_and_stops(ws, tokenizer_dirs, tmp_path, capsys):
    assert main(cli_args(ws, tokenizer_dirs, tmp_path) + ["--debug_dataset"]) == 0
    out = capsys.readouterr().out
    assert "no model was loaded" in out and "images" in out
    assert not list(tmp_path.glob("*.safetensors"))


def test_tokenizer_cache_dir_uses_sd_scripts_folder_names(ws, tokenizer_dirs, tmp_path):
    import shutil

    cache = tmp_path / "tokenizers"
    shutil.copytree(tokenizer_dirs["clip_l"], cache / "openai_clip-vit-large-patch14")
    argv = [w for w in cli_args(ws, tokenizer_dirs, tmp_path)]
    i = argv.index("--clip_l_tokenizer")
    del argv[i:i + 2]
    from trainer.cli import config_from_args

    warnings = []
    config = config_from_args(parse_command_line(argv + ["--tokenizer_cache_dir", str(cache)]), warn=warnings.append)
    assert config.models.clip_l_tokenizer == str(cache / "openai_clip-vit-large-patch14")
    assert config.models.t5xxl_tokenizer == str(tokenizer_dirs["t5xxl"])  # given explicitly: kept
    assert warnings == []


@pytest.mark.parametrize("extra,message", [
    (["--use_8bit_adam", "--use_lion_optimizer"], "cannot be used together"),
    (["--use_8bit_adam", "--optimizer_type", "AdamW"], "give only --optimizer_type"),
    (["--model_type", "chroma"], "holds a FLUX.1 transformer, but --model_type is 'chroma'; set --model_type flux"),
    (["--dataset_class", "my.Dataset"], "--dataset_class is not supported"),
    (["--controlnet_model_name_or_path", "cn.safetensors"], "--controlnet_model_name_or_path is not supported"),
    (["--output_config"], "--output_config writes the options to --config_file"),
    (["--torch_compile", "--dynamo_backend", "no"], "torch_compile"),
])
def test_refusals_name_the_option(ws, tokenizer_dirs, tmp_path, capsys, extra, message):
    assert main(cli_args(ws, tokenizer_dirs, tmp_path) + extra) == 2
    assert message in capsys.readouterr().err


def test_dataset_config_wins_over_folder_options_with_a_warning(ws, tokenizer_dirs, tmp_path):
    from trainer.cli import config_from_args

    warnings = []
    config = config_from_args(parse_command_line(cli_args(ws, tokenizer_dirs, tmp_path) + [
        "--train_data_dir", "images", "--reg_data_dir", "reg"]), warn=warnings.append)
    assert config.data.train_data_dir is None and config.data.reg_data_dir is None and config.data.dataset_config
    assert warnings == ["--dataset_config is given, so --train_data_dir, --reg_data_dir are ignored (as sd-scripts "
                        "does)"]


MODELS = ('pretrained_model_name_or_path = "f.safetensors"\nclip_l = "c.safetensors"\nt5xxl = "t.safetensors"\n'
          'ae = "a.safetensors"\n')


def test_gui_ints_for_ticked_boxes_act_like_booleans(tmp_path):
    """The kohya_ss GUI writes 1/0 for ticked boxes; sd-scripts sets the value on its namespace as written, so they
    act as true/false there. A string stays refused: "false" would be true in sd-scripts."""
    config = tmp_path / "gui.toml"
    config.write_text(MODELS + "persistent_data_loader_workers = 1\ngradient_checkpointing = 0\n")
    ns = vars(parse_command_line(["--config_file", str(config)]))
    assert ns["persistent_data_loader_workers"] is True and "gradient_checkpointing" not in ns


def test_a_list_for_a_one_value_key_names_the_key(tmp_path, capsys):
    config = tmp_path / "listed.toml"
    config.write_text("network_dim = [4, 8]\n")
    assert main(["--config_file", str(config)]) == 2
    err = capsys.readouterr().err
    assert "'network_dim' = [4, 8]" in err and "--network_dim takes one value, not a list" in err


@pytest.mark.parametrize("text, warned", [
    ('huggingface_repo_id = ""\nhuggingface_repo_type = "model"\nmax_timestep = 1000\nmin_timestep = 0\n', []),
    ('huggingface_repo_id = "me/lora"\nhuggingface_repo_type = "model"\nmax_timestep = 900\n',
     ["--huggingface_repo_id", "--huggingface_repo_type", "--max_timestep"]),
])
def test_gui_defaults_that_would_not_act_in_sd_scripts_do_not_warn(tmp_path, text, warned):
    from trainer.cli import config_from_args

    config = tmp_path / "gui.toml"
    config.write_text(MODELS + 'train_data_dir = "images"\n' + text)
    warnings = []
    config_from_args(parse_command_line(["--config_file", str(config)], warn=warnings.append),
                     warn=warnings.append)
    assert sorted(w.split()[0] for w in warnings) == warned


def test_output_config_never_replaces_a_file(ws, tokenizer_dirs, tmp_path, capsys):
    mine = tmp_path / "mine.toml"
    mine.write_text("learning_rate = 0.5\n")
    argv = cli_args(ws, tokenizer_dirs, tmp_path) + ["--config_file", str(mine), "--output_config"]
    assert main(argv) == 2
    assert "mine.toml exists; it is not replaced" in capsys.readouterr().err
    assert mine.read_text() == "learning_rate = 0.5\n" and sorted(p.name for p in tmp_path.iterdir()) == ["mine.toml"]


def test_output_config_writes_only_the_options_given(tmp_path):
    from trainer.tomlio import loads

    written = tmp_path / "given.toml"
    argv = ["--pretrained_model_name_or_path", "f.safetensors", "--clip_l", "c", "--t5xxl", "t", "--ae", "a",
            "--network_dim", "8", "--output_dir", "out"]
    assert main(argv + ["--config_file", str(written), "--output_config"]) == 0
    assert loads(written.read_text()) == {"pretrained_model_name_or_path": "f.safetensors", "clip_l": "c",
                                          "t5xxl": "t", "ae": "a", "network_dim": 8, "output_dir": "out"}


@pytest.mark.parametrize("content, message", [
    ((MODELS + "learning_rate = 1e-4\n").encode("utf-16"), None),  # a BOM says what it is: read
    ("learning_rate = 1e-4\n".encode("utf-16-le"), "holds NUL characters"),
    (bytes(range(128, 256)), "not UTF-8 text"),
    (b"a = " + b"[" * 100_000, "nested more than 100 levels deep"),
])
def test_config_file_encodings_and_nesting(tmp_path, capsys, content, message):
    config = tmp_path / "odd.toml"
    config.write_bytes(content)
    if message is None:
        assert vars(parse_command_line(["--config_file", str(config)]))["learning_rate"] == 1e-4
        return
    assert main(["--config_file", str(config)]) == 2
    err = capsys.readouterr().err
    assert "config_file" in err and "odd.toml" in err and message in err


def test_output_dir_has_sd_scripts_default_and_a_run_needs_it(ws, tokenizer_dirs, tmp_path, capsys):
    from trainer.cli import build_parser

    help_text = " ".join(build_parser().format_help().split())
    entry = help_text.rsplit("--output_dir OUTPUT_DIR ", 1)[1].split(" --", 1)[0]  # its entry, after the usage line
    assert "needed to train" in entry and "default" not in entry  # sd-scripts has none
    argv = [word for word in cli_args(ws, tokenizer_dirs, tmp_path) if word not in ("--output_dir", str(tmp_path))]
    assert main(argv + ["--max_train_steps", "1"]) == 2
    assert "--output_dir is required" in capsys.readouterr().err and not list(tmp_path.iterdir())
    assert main(argv + ["--check_only"]) == 0  # a check saves nothing

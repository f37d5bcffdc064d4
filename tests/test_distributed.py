"""Several processes: torchrun with 2 CPU processes (gloo), each training half of every batch, ends with the same
LoRA as one process with the same global batch."""

import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from trainer.cli import main

from datagen import rgb
from trainspace import cli_args, make_workspace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tokenizer_dirs):
    ws = make_workspace(tmp_path / "ws", batch_size=2)
    per_process = tmp_path / "ws" / "dataset_bs1.toml"
    per_process.write_text(ws["toml"].read_text().replace("batch_size = 2", "batch_size = 1"))
    common = ["--max_train_steps", "6", "--seed", "5", "--learning_rate", "2e-3", "--network_dim", "4",
              "--network_train_unet_only", "--timestep_sampling", "flux_shift", "--model_prediction_type", "raw",
              "--guidance_scale", "1.0", "--cache_text_encoder_outputs", "--cache_latents_to_disk",
              "--output_name", "ddp"]
    assert main(cli_args(ws, tokenizer_dirs, tmp_path / "single") + common) == 0

    args = cli_args(ws, tokenizer_dirs, tmp_path / "two")
    args[args.index("--dataset_config") + 1] = str(per_process)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), "-m", "trainer"] + args + common
                         + ["--ddp_timeout", "5", "--ddp_gradient_as_bucket_view", "--ddp_static_graph"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    single = load_file(tmp_path / "single" / "ddp.safetensors")
    two = load_file(tmp_path / "two" / "ddp.safetensors")
    assert single.keys() == two.keys()
    assert max((single[k] - two[k]).abs().max().item() for k in single) < 1e-5
    assert any(v.abs().max() > 0 for k, v in two.items() if "lora_up" in k)


@pytest.mark.parametrize("processes", [2, 3])
def test_partial_batches_give_the_single_process_gradient(tmp_path, tokenizer_dirs, processes):
    """4 images in 3 buckets: most batches are partial, so some processes get fewer real samples (or none). Each
    step's gradient must still be the mean over the batch's real samples, as in one process."""
    ws = make_workspace(tmp_path / "ws")
    data = tmp_path / "uneven"
    for name, size in (("a", (64, 64)), ("b", (64, 64)), ("c", (128, 64)), ("d", (64, 128))):
        rgb(data / f"{name}.png", *size, caption=f"image {name}", seed=ord(name))
    toml = '[general]\ncaption_extension = ".txt"\nenable_bucket = true\nmin_bucket_reso = 32\n' \
           'max_bucket_reso = 128\nbucket_reso_steps = 16\n[[datasets]]\nresolution = 64\nbatch_size = {}\n' \
           f'[[datasets.subsets]]\nimage_dir = "{data.as_posix()}"\n'
    (tmp_path / "whole.toml").write_text(toml.format(processes))
    (tmp_path / "slice.toml").write_text(toml.format(1))
    common = ["--max_train_steps", "6", "--seed", "7", "--learning_rate", "2e-3", "--network_dim", "4",
              "--network_train_unet_only", "--guidance_scale", "1.0", "--cache_text_encoder_outputs",
              "--cache_latents", "--output_name", "ddp"]
    args = cli_args(ws, tokenizer_dirs, tmp_path / "single")
    args[args.index("--dataset_config") + 1] = str(tmp_path / "whole.toml")
    assert main(args + common) == 0

    args = cli_args(ws, tokenizer_dirs, tmp_path / "many")
    args[args.index("--dataset_config") + 1] = str(tmp_path / "slice.toml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "trainer"]
                         + args + common, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    single = load_file(tmp_path / "single" / "ddp.safetensors")
    many = load_file(tmp_path / "many" / "ddp.safetensors")
    assert max((single[k] - many[k]).abs().max().item() for k in single) < 1e-5


@pytest.mark.parametrize("requested, local_rank, expected", [
    ("cuda", "1", "cuda:1"),     # --device cuda under torchrun: this process's own card
    (None, "2", "cuda:2"),       # no --device on a CUDA machine: the same
    ("cuda:0", "1", "cuda:0"),   # an explicit index is taken as given
    ("cpu", "1", "cpu"),
])
def test_each_process_picks_its_own_card(monkeypatch, requested, local_rank, expected):
    import torch

    from trainer.distributed import pick_device

    current = []
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert pick_device(requested) == torch.device(expected)
    assert current == ([torch.device(expected)] if requested != "cuda:0" and expected != "cpu" else [])

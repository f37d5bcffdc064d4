"""The training loop on tiny models: it learns, resumes bit-exactly, stops gracefully, saves as sd-scripts names."""

import pytest
import torch
from safetensors.torch import load_file

from trainer.events import Finished, Saved, SilentReporter, StepEnd
from trainer.loop import train
from trainer.lora import LoRAConfig, apply_lora
from trainer.models import load_flux

from trainspace import config, make_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


class StopAfter(SilentReporter):
    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def should_stop(self) -> bool:
        return sum(isinstance(e, StepEnd) for e in self.events) >= self.steps


def test_training_drives_the_loss_down_and_the_lora_changes_the_model(ws, tokenizer_dirs, tmp_path):
    reporter = SilentReporter()
    path = train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=60, lr_scheduler="cosine", lr_warmup_steps=4,
                        network=LoRAConfig(network_dim=8, network_alpha=8, network_train_unet_only=True)),
                 reporter).lora
    losses = [e.loss for e in reporter.of(StepEnd)]
    assert len(losses) == 60
    first, last = sum(losses[:12]) / 12, sum(losses[-12:]) / 12
    assert last < 0.7 * first, (first, last)
    flux = load_flux(ws["flux"])
    x = [torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))]
    from trainer.flow import image_ids, text_ids

    inputs = dict(img=x[0], img_ids=image_ids(1, 8, 8), txt=torch.randn(1, 4, 32), txt_ids=text_ids(1, 4),
                  timesteps=torch.tensor([0.5]), y=torch.randn(1, 64), guidance=torch.tensor([1.0]))
    with torch.no_grad():
        before = flux(**inputs)
        apply_lora(flux, path)
        after = flux(**inputs)
    assert (after - before).abs().max() > 1e-3
    assert reporter.of(Finished)[0].lora == path == tmp_path / "test_lora.safetensors"


@pytest.mark.parametrize("stop_at", [4, 6], ids=["at-an-epoch-end", "inside-an-epoch"])
def test_resume_matches_an_uninterrupted_run_bit_exactly(ws, tokenizer_dirs, tmp_path, stop_at):
    common = dict(max_train_steps=10, lr_scheduler="cosine", lr_warmup_steps=3, optimizer_type="AdamW",
                  max_grad_norm=0.5)
    straight = train(config(ws, tokenizer_dirs, tmp_path / "a", **common), SilentReporter()).lora
    stopper = StopAfter(stop_at)  # 4 batches per epoch
    train(config(ws, tokenizer_dirs, tmp_path / "b", **common), stopper)
    finished = stopper.of(Finished)[0]
    assert finished.stopped_early and finished.steps == stop_at
    state = tmp_path / "b" / "test_lora-state"
    assert (state / "train_state.json").is_file() and any(e.kind == "state" for e in stopper.of(Saved))
    resumed = train(config(ws, tokenizer_dirs, tmp_path / "b", resume=str(state), **common), SilentReporter()).lora
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_every_n_steps_and_epochs_with_rotation(ws, tokenizer_dirs, tmp_path):
    train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=12, save_every_n_steps=2, save_last_n_steps=4,
                 save_every_n_epochs=1, save_last_n_epochs=1, save_state=True), SilentReporter())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "test_lora.safetensors" in names
    # sd-scripts keeps the saves of the last 4 steps counting the one 4 steps back, and saves at the last step too
    assert [n for n in names if n.startswith("test_lora-step") and n.endswith(".safetensors")] == [
        "test_lora-step00000008.safetensors", "test_lora-step00000010.safetensors",
        "test_lora-step00000012.safetensors"]
    assert [n for n in names if n.startswith("test_lora-0000") and n.endswith(".safetensors")] == [
        "test_lora-000002.safetensors"]
    assert "test_lora-000002-state" in names and "test_lora-step00000010-state" in names
    assert "test_lora-step00000006-state" not in names and "test_lora-state" in names  # --save_state: final too
    assert (tmp_path / "test_lora_metrics.jsonl").read_text().count("\n") == 12


def test_gradient_accumulation_counts_optimizer_steps(ws, tokenizer_dirs, tmp_path):
    reporter = SilentReporter()
    train(config(ws, tokenizer_dirs, tmp_path, max_train_epochs=2, gradient_accumulation_steps=2), reporter)
    assert [e.step for e in reporter.of(StepEnd)] == [1, 2, 3, 4]  # 4 batches per epoch / 2


def test_metadata_of_the_trained_lora(ws, tokenizer_dirs, tmp_path):
    from safetensors import safe_open

    path = train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=2, save_precision="fp16"), SilentReporter()).lora
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_base_model_version"] == "flux1"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_steps"] == "2"
    assert meta["ss_timestep_sampling"] == "flux_shift" and meta["ss_guidance_scale"] == "1.0"
    assert "red" in meta["ss_tag_frequency"] or "a red circle on a white background" in meta["ss_tag_frequency"]
    assert meta["ss_num_train_images"] == "8" and meta["ss_seed"] == "3"


def test_without_caches_the_encoders_run_each_step_reproducibly(ws, tokenizer_dirs, tmp_path, monkeypatch):
    from trainer.models.autoencoder import AutoEncoder
    from trainer.models.text_encoders import T5XXL

    calls = {"ae": 0, "t5": 0}
    encode, t5_forward = AutoEncoder.encode, T5XXL.forward

    def counting_encode(self, *args, **kwargs):
        calls["ae"] += 1
        return encode(self, *args, **kwargs)

    def counting_t5(self, *args, **kwargs):
        calls["t5"] += 1
        return t5_forward(self, *args, **kwargs)

    monkeypatch.setattr(AutoEncoder, "encode", counting_encode)
    monkeypatch.setattr(T5XXL, "forward", counting_t5)
    options = dict(cache_latents=False, cache_text_encoder_outputs=False, max_train_steps=3)
    a = train(config(ws, tokenizer_dirs, tmp_path / "a", **options), SilentReporter()).lora
    assert calls == {"ae": 3, "t5": 3}
    b = train(config(ws, tokenizer_dirs, tmp_path / "b", **options), SilentReporter()).lora
    first, second = load_file(a), load_file(b)
    assert all(torch.equal(first[k], second[k]) for k in first)

"""Where sd-scripts' saving, preview and precision rules differ from what this trainer did, now fixed: each test
failed before its fix (issue 13, fixes 1, 4, 5, 6) or proves an option that did not act (scale_weight_norms,
save_n_epoch_ratio, save_last_n_steps_state, metadata_*, no_metadata)."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from trainer.events import Samples, SilentReporter
from trainer.loop import previews_due, train
from trainer.lora import LoRANetwork
from trainer.lora.max_norm import scale_weight_norms

from trainspace import config, make_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))  # 8 images, batch 2: 4 steps per epoch


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_full_fp16_trains_with_fp16_lora_weights(ws, tokenizer_dirs, tmp_path):
    """Fix 1: the stock GradScaler refuses to unscale fp16 gradients, so --full_fp16 died at the first step."""
    finished = train(config(ws, tokenizer_dirs, tmp_path, mixed_precision="fp16", full_fp16=True, max_train_steps=2,
                            optimizer_type="AdamW8bit"), SilentReporter())
    assert finished.steps == 2 and not finished.stopped_early
    with safe_open(str(finished.lora), "pt") as f:
        assert f.get_tensor(next(k for k in f.keys() if k.endswith("lora_up.weight"))).abs().sum() > 0


def test_full_fp16_with_torch_adamw_is_advised_against(ws, tokenizer_dirs, tmp_path):
    advice = config(ws, tokenizer_dirs, tmp_path, mixed_precision="fp16", full_fp16=True).advice()
    assert any("eps" in note and "AdamW8bit" in note for note in advice)


def test_save_state_with_periodic_saves_also_saves_the_final_state(ws, tokenizer_dirs, tmp_path):
    """Fix 4 and 5: --save_state writes the final state folder too; a step save lands on the last step."""
    train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=4, save_every_n_steps=2, save_state=True),
          SilentReporter())
    found = names(tmp_path)
    assert "test_lora-state" in found
    assert "test_lora-step00000004.safetensors" in found and "test_lora-step00000004-state" in found


def test_save_last_n_steps_state_keeps_its_own_count(ws, tokenizer_dirs, tmp_path):
    train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=8, save_every_n_steps=2, save_last_n_steps=2,
                 save_last_n_steps_state=4, save_state=True), SilentReporter())
    found = names(tmp_path)
    assert [n for n in found if n.endswith(".safetensors") and "-step" in n] == [
        "test_lora-step00000006.safetensors", "test_lora-step00000008.safetensors"]
    assert [n for n in found if n.endswith("-state") and "-step" in n] == [
        "test_lora-step00000004-state", "test_lora-step00000006-state", "test_lora-step00000008-state"]


def test_save_n_epoch_ratio_sets_the_epoch_cadence(ws, tokenizer_dirs, tmp_path):
    train(config(ws, tokenizer_dirs, tmp_path, max_train_epochs=4, save_n_epoch_ratio=2), SilentReporter())
    assert [n for n in names(tmp_path) if n.startswith("test_lora-0")] == ["test_lora-000002.safetensors"]


@pytest.mark.parametrize("steps,epochs,at_step,at_epoch,due", [
    (2, None, 4, None, True), (2, None, 3, None, False), (2, None, 4, 1, False),  # steps only: not at epoch ends
    (2, 1, 4, None, False), (2, 1, None, 1, True),  # both: the step cadence is ignored
    (None, None, 4, None, False), (None, None, None, 1, False),  # neither: no previews at all
])
def test_preview_cadence_follows_sd_scripts(ws, tokenizer_dirs, tmp_path, steps, epochs, at_step, at_epoch, due):
    c = config(ws, tokenizer_dirs, tmp_path, sample_every_n_steps=steps, sample_every_n_epochs=epochs)
    assert previews_due(c, step=at_step, epoch=at_epoch) is due


def test_previews_in_a_run(ws, tokenizer_dirs, tmp_path):
    """Fix 6: no previews at the end without a cadence (unless sample_at_end, the nodes' default); with both
    cadences only the epoch one; a run cut by max_train_steps mid-epoch still ends that epoch's cadence."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 1\n")

    def run(folder, **options):
        reporter = SilentReporter()
        train(config(ws, tokenizer_dirs, tmp_path / folder, sample_prompts=str(prompts), **options), reporter)
        return [e.step for e in reporter.of(Samples)]

    assert run("none", max_train_steps=2) == []
    assert run("end", max_train_steps=2, sample_at_end=True) == [2]
    assert run("both", max_train_steps=6, sample_every_n_steps=1, sample_every_n_epochs=1) == [4, 6]


def test_scale_weight_norms_caps_each_lora_update():
    from trainer.config import LoRAConfig
    from trainer.models.flux import Flux
    from trainer.models.tiny import TINY_FLUX

    torch.manual_seed(0)
    network = LoRANetwork.create(LoRAConfig(network_dim=4, network_alpha=2, split_qkv=True), Flux(TINY_FLUX))
    with torch.no_grad():
        for i, lora in enumerate(network.loras):
            lora.lora_up.weight.normal_(std=0.5 if i % 2 else 0.001)  # every other LoRA is far over the cap
    before = {lora.lora_name: lora.weight_delta() for lora in network.loras}

    def part_norms(lora, delta):
        return [d.norm().item() for d in (delta.split(list(lora.splits)) if lora.splits else [delta])]

    over = sum(n > 0.5 for lora in network.loras for n in part_norms(lora, before[lora.lora_name]))
    result = scale_weight_norms(network, 0.5)
    assert result.keys_scaled == over > 0
    for lora in network.loras:
        old, new = before[lora.lora_name], lora.weight_delta()
        for was, now, part_old, part_new in zip(part_norms(lora, old), part_norms(lora, new),
                                                 old.split(list(lora.splits)) if lora.splits else [old],
                                                 new.split(list(lora.splits)) if lora.splits else [new]):
            if was > 0.5:
                assert now == pytest.approx(0.5, rel=1e-4)  # capped, direction kept
                assert torch.allclose(part_new, part_old * (0.5 / was), rtol=1e-4, atol=1e-7)
            else:
                assert torch.equal(part_new, part_old)
    assert result.max_norm == pytest.approx(0.5, rel=1e-4)


def test_scale_weight_norms_in_training_and_metadata_options(ws, tokenizer_dirs, tmp_path):
    finished = train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=3, learning_rate=0.5,
                            scale_weight_norms=0.01, metadata_author="me", metadata_trigger_phrase="sks",
                            metadata_license="CC0"), SilentReporter())
    from safetensors.torch import load_file

    tensors = load_file(str(finished.lora))
    for key in [k for k in tensors if k.endswith("lora_down.weight")]:
        name = key.removesuffix(".lora_down.weight")
        down, up = tensors[key].float(), tensors[f"{name}.lora_up.weight"].float()
        alpha = tensors[f"{name}.alpha"].item()
        assert ((up @ down) * alpha / down.shape[0]).norm() <= 0.01 * 1.001
    meta = finished.metadata
    assert meta["modelspec.author"] == "me" and meta["modelspec.trigger_phrase"] == "sks"
    assert meta["modelspec.license"] == "CC0" and "ss_learning_rate" in meta


def test_no_metadata_keeps_only_what_loaders_need(ws, tokenizer_dirs, tmp_path):
    finished = train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=1, no_metadata=True), SilentReporter())
    with safe_open(str(finished.lora), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_module"] == "networks.lora_flux"
    assert "ss_learning_rate" not in meta and "ss_datasets" not in meta and "modelspec.architecture" in meta


@pytest.mark.parametrize("options,steps", [
    ({"initial_step": 5, "skip_until_initial_step": True}, [6, 7, 8]),
    ({"initial_step": 5}, [5, 6, 7, 8]),  # without skipping: from the start of the epoch holding step 5
    ({"initial_epoch": 2}, [5, 6, 7, 8]),
])
def test_initial_step_and_epoch(ws, tokenizer_dirs, tmp_path, options, steps):
    from trainer.events import StepEnd

    reporter = SilentReporter()
    train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=8, **options), reporter)
    assert [e.step for e in reporter.of(StepEnd)] == steps
    assert all(e.epoch == 2 for e in reporter.of(StepEnd))  # 4 steps per epoch


def test_skip_until_initial_step_sees_the_uninterrupted_runs_batches(ws, tokenizer_dirs, tmp_path, monkeypatch):
    """From scratch, --initial_step 5 --skip_until_initial_step trains steps 6.. on the very images (and noise step
    numbers) an uninterrupted run trains them on; without skipping, the epoch's first batches come again."""
    import trainer.step as step_module
    from trainer.errors import ConfigError

    seen = []
    original = step_module.loss

    def recording(ctx, batch, step):
        seen.append((step, tuple(Path(p).name for p in batch.paths)))
        return original(ctx, batch, step)

    monkeypatch.setattr(step_module, "loss", recording)
    train(config(ws, tokenizer_dirs, tmp_path / "a", max_train_steps=8), SilentReporter())
    straight, seen[:] = list(seen), []
    train(config(ws, tokenizer_dirs, tmp_path / "b", max_train_steps=8, initial_step=5, skip_until_initial_step=True),
          SilentReporter())
    assert seen == straight[5:]
    seen.clear()
    train(config(ws, tokenizer_dirs, tmp_path / "c", max_train_steps=8, initial_step=5), SilentReporter())
    assert seen == straight[4:]  # from the start of epoch 2 (steps 5..8)
    with pytest.raises(ConfigError, match="initial_step 8: must be below the run's 8 training steps"):
        train(config(ws, tokenizer_dirs, tmp_path / "d", max_train_steps=8, initial_step=8), SilentReporter())


def test_resuming_a_finished_run_trains_nothing_more(ws, tokenizer_dirs, tmp_path):
    """A state saved at the last step, resumed with the same length: no step past --max_train_steps."""
    from trainer.events import Message, StepEnd

    train(config(ws, tokenizer_dirs, tmp_path / "a", max_train_steps=3, save_state=True), SilentReporter())
    reporter = SilentReporter()
    finished = train(config(ws, tokenizer_dirs, tmp_path / "b", max_train_steps=3,
                            resume=str(tmp_path / "a" / "test_lora-state")), reporter)
    assert reporter.of(StepEnd) == [] and finished.steps == 3
    assert any("nothing left to train" in e.text for e in reporter.of(Message))


def test_metrics_log_keeps_the_steps_before_an_initial_step(ws, tokenizer_dirs, tmp_path):
    import json

    train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=4), SilentReporter())
    train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=8, initial_step=4, skip_until_initial_step=True),
          SilentReporter())
    steps = [json.loads(line)["step"] for line in (tmp_path / "test_lora_metrics.jsonl").read_text().splitlines()
             if '"step"' in line and '"loss"' in line]
    assert steps == list(range(1, 9))


def test_validation_loss_in_a_run(ws, tokenizer_dirs, tmp_path):
    """validation_split 0.25 of 8 images: 6 train (3 steps an epoch at batch 2), 2 held out; validation every 2 steps
    and at each epoch's end, each pass the same fixed sigmas and noise."""
    from trainer.events import StepEnd, ValidationEnd

    reporter = SilentReporter()
    finished = train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=6, validation_split=0.25,
                            validate_every_n_steps=2), reporter)
    assert [e.step for e in reporter.of(StepEnd)] == [1, 2, 3, 4, 5, 6]
    passes = [(e.step, e.epoch, e.per_epoch) for e in reporter.of(ValidationEnd)]
    assert passes == [(2, 1, False), (3, 1, True), (4, 2, False), (6, 2, False), (6, 2, True)]
    losses = [e.average_loss for e in reporter.of(ValidationEnd)]
    assert all(loss > 0 for loss in losses) and len(set(losses)) > 1  # the LoRA changes between passes
    assert finished.metadata["ss_num_validation_images"] == "2" and finished.metadata["ss_validation_split"] == "0.25"
    from trainer.preflight import preflight_report

    report = preflight_report(config(ws, tokenizer_dirs, tmp_path, validation_split=0.25)).text()
    assert "6 images" in report and "validation: 2 images held out" in report and "3 steps per epoch" in report

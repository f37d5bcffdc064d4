"""Out of memory, handled (issue 18): torch.OutOfMemoryError in any phase becomes one OutOfMemoryError whose
message says where, what was resident, peak and free memory and what to change; the LoRA and a resumable state of
the last good step are on disk; the models are freed; `--memory auto` (train(step_down=True)) goes on one setting
leaner and ends with the LoRA a run resumed with that setting gives. The fault hook FLUX_TRAINER_FAULT_OOM
(trainer/oom.py) raises torch's own error at a chosen phase and step, on the CPU."""

import gc

import pytest
import torch
from safetensors.torch import load_file

from trainer import memory, oom
from trainer.errors import OutOfMemoryError
from trainer.events import Message, SilentReporter, StepEnd
from trainer.loop import train

from trainspace import config, make_workspace

STEPS = 5  # 4 batches per epoch: the run crosses an epoch


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


@pytest.fixture
def fault(monkeypatch):
    """fault("step@3") makes the run raise torch.OutOfMemoryError there (once)."""
    oom._injected.clear()
    yield lambda spec: monkeypatch.setenv(oom.FAULT_ENV, spec)
    oom._injected.clear()



@pytest.fixture(scope="module")
def straight(ws, tokenizer_dirs, tmp_path_factory):
    """An uninterrupted run that also keeps the state of step 2."""
    out = tmp_path_factory.mktemp("straight")
    result = train(config(ws, tokenizer_dirs, out, max_train_steps=STEPS, save_every_n_steps=2, save_state=True),
                   SilentReporter())
    return {"lora": load_file(result.lora), "state2": out / "test_lora-step00000002-state"}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_out_of_memory_in_a_step_saves_the_last_good_step_and_frees_everything(ws, tokenizer_dirs, tmp_path, fault,
                                                                                flux_refs, straight, monkeypatch):
    released, teardown = [], memory.teardown

    def spy(flux, device=None):
        released.append((flux.block_runner is not None, device))
        teardown(flux, device)

    monkeypatch.setattr(memory, "teardown", spy)
    fault("step@3")
    with pytest.raises(OutOfMemoryError) as info:
        train(config(ws, tokenizer_dirs, tmp_path / "a", max_train_steps=STEPS), SilentReporter())
    error, text = info.value, str(info.value)
    assert text.startswith("out of memory while training step 3 of 5. Resident: transformer (float32 weights, no "
                           "blocks swapped, no gradient checkpointing) on cpu, text encoders freed (their outputs "
                           "cached), LoRA of ")
    assert "Memory: peak and free memory unknown (on cpu" in text
    assert "Next: at 64², batch 2: --blocks_to_swap 8." in text
    state = tmp_path / "a" / "test_lora-state"
    assert f"Saved: the LoRA of step 2 ({tmp_path / 'a' / 'test_lora.safetensors'}) and a resumable state " \
           f"({state}): add --resume {state}" in text
    assert "(torch: CUDA out of memory" in text and error.__cause__ is None and error.__suppress_context__
    assert (error.step, error.state, error.seed) == (2, state, 3)
    gc.collect()
    assert flux_refs and all(ref() is None for ref in flux_refs), "the transformer outlived the error"
    assert released == [(True, "cpu")], "the block runner was dropped, not released (to the host: the run failed)"

    reporter = SilentReporter()  # the state is the last good step's: going on from it is the uninterrupted run
    result = train(config(ws, tokenizer_dirs, tmp_path / "a", max_train_steps=STEPS, resume=str(state)), reporter)
    assert [e.step for e in reporter.of(StepEnd)] == [3, 4, 5]
    assert _same(load_file(result.lora), straight["lora"])


def test_memory_auto_steps_down_and_ends_with_what_the_leaner_setting_gives(ws, tokenizer_dirs, tmp_path, fault,
                                                                           straight):
    fault("step@3")
    reporter = SilentReporter()
    result = train(config(ws, tokenizer_dirs, tmp_path / "auto", max_train_steps=STEPS), reporter, step_down=True)
    assert result.steps == STEPS and not result.stopped_early
    changes = [m.text for m in reporter.of(Message) if "memory auto" in m.text]
    assert changes == ["out of memory while training step 3 of 5: memory auto continues from step 2 with "
                       "--blocks_to_swap 8 (was 0)"]
    assert [e.step for e in reporter.of(StepEnd)] == [1, 2, 3, 4, 5]  # no step lost, none trained twice

    leaner = train(config(ws, tokenizer_dirs, tmp_path / "leaner", max_train_steps=STEPS, blocks_to_swap=8,
                          resume=str(straight["state2"])), SilentReporter())
    assert _same(load_file(result.lora), load_file(leaner.lora))


@pytest.mark.parametrize("spec, phase, saved", [
    ("loading@0", "loading the autoencoder", False),
    ("caching@0", "caching latents", False),
    ("saving@2", "saving the LoRA after step 2", True),
    ("previews@2", "rendering previews after step 2", True),
    ("validation@2", "computing the validation loss after step 2", True),
])
def test_out_of_memory_in_every_phase_says_where(ws, tokenizer_dirs, tmp_path, fault, spec, phase, saved):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 1\n")
    options = {"saving@2": dict(save_every_n_steps=2), "previews@2": dict(sample_prompts=str(prompts),
                                                                          sample_every_n_steps=2),
               "validation@2": dict(validation_split=0.25, validate_every_n_steps=2, cache_latents=False,
                                    cache_text_encoder_outputs=False)}.get(spec, {})
    fault(spec)
    with pytest.raises(OutOfMemoryError, match=f"^out of memory while {phase}\\. Resident: ") as info:
        train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=3, **options), SilentReporter())
    state = tmp_path / "test_lora-state"
    assert state.is_dir() is saved and (tmp_path / "test_lora.safetensors").is_file() is saved
    if saved:
        assert load_file(tmp_path / "test_lora.safetensors") and info.value.step == 2
    else:
        assert "Nothing new was saved: nothing was trained yet." in str(info.value)


def test_an_optimizer_step_cut_short_saves_nothing_half_updated(ws, tokenizer_dirs, tmp_path, monkeypatch, fault):
    original, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(OutOfMemoryError, match=r"training step 3 of 5\. .* Nothing new was saved: the optimizer "
                                               r"step after step 2 was cut short") as info:
        train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=STEPS, save_every_n_steps=1, save_state=True),
              SilentReporter(), step_down=True)  # progress cannot be kept: no step-down either
    assert info.value.state is None and "Tried to allocate 2.00 MiB" in str(info.value)
    assert not (tmp_path / "test_lora-state").exists()
    assert (tmp_path / "test_lora-step00000002-state").is_dir()  # what was saved before is kept


def test_the_fault_hook_refuses_a_spec_it_cannot_read(monkeypatch):
    monkeypatch.setenv(oom.FAULT_ENV, "stepp@3")
    with pytest.raises(ValueError, match="expected <phase>@<step>"):
        oom.inject("step", 3)


def test_on_cuda_the_message_gives_this_runs_peak_and_the_free_memory(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: int(14.9 * gib))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(0.4 * gib), int(15.6 * gib)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(15.0 * gib))
    text, usable = oom.memory_figures(torch.device("cuda", 0))
    assert text == "peak 14.9 GiB allocated, 0.4 GiB free of 15.6 GiB (15.4 GiB once this run's memory is given back)"
    assert usable == int(0.4 * gib) + int(15.0 * gib)

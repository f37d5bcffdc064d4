"""`train()` as an in-process entry point (what the ComfyUI nodes call): its result, what it leaves behind in the
host process (no model kept alive, random states untouched, inference mode overridden), and Cancel in every phase
where time is spent."""

import gc
import random

import pytest
import torch
from safetensors.torch import load_file

from trainer import session as session_module
from trainer.errors import PromptFileError, Stopped
from trainer.events import Finished, Phase, Samples, Saved, SilentReporter, StepEnd
from trainer.loop import train

from trainspace import config, make_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))



class StopWhen(SilentReporter):
    """Asks to stop once `condition(events)` holds."""

    def __init__(self, condition):
        super().__init__()
        self.condition = condition

    def should_stop(self) -> bool:
        return self.condition(self.events)


def _steps(events) -> int:
    return sum(isinstance(e, StepEnd) for e in events)


def _host_state():
    return torch.random.get_rng_state().clone(), random.getstate()


def _assert_host_untouched(before, flux_refs):
    rng, py = before
    assert torch.equal(torch.random.get_rng_state(), rng), "train() changed the host's torch RNG"
    assert random.getstate() == py, "train() changed the host's Python RNG"
    gc.collect()
    assert flux_refs and all(ref() is None for ref in flux_refs), "the transformer is still reachable after train()"


def test_result_carries_the_saved_lora_as_a_state_dict(ws, tokenizer_dirs, tmp_path, flux_refs):
    torch.manual_seed(1234)
    random.seed(99)
    before = _host_state()
    reporter = SilentReporter()
    result = train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=3, save_precision="bf16",
                          optimizer_type="AdamW", optimizer_args=("weight_decay=0.02",)), reporter)
    assert isinstance(result, Finished) and result == reporter.of(Finished)[0]
    assert result.steps == 3 and not result.stopped_early and len(result.losses) == 3
    saved = load_file(result.lora)
    assert result.state_dict.keys() == saved.keys() and len(saved) > 0
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, saved[k]) for k, v in result.state_dict.items())
    assert result.metadata["ss_steps"] == "3" and result.metadata["ss_optimizer"] == "AdamW(weight_decay=0.02)"
    _assert_host_untouched(before, flux_refs)


def test_a_stop_during_training_frees_everything_and_keeps_the_host_state(ws, tokenizer_dirs, tmp_path, flux_refs):
    before = _host_state()
    result = train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=8), StopWhen(lambda e: _steps(e) >= 2))
    assert result.stopped_early and result.steps == 2
    _assert_host_untouched(before, flux_refs)


def test_an_error_mid_run_keeps_its_traceback_and_frees_everything(ws, tokenizer_dirs, tmp_path, flux_refs,
                                                                   monkeypatch):
    from trainer import flow

    original, calls = flow.batch_loss, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in step 3")
        return original(*args, **kwargs)

    monkeypatch.setattr(flow, "batch_loss", failing)
    before = _host_state()
    with pytest.raises(RuntimeError, match="boom in step 3") as info:
        train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=8), SilentReporter())
    assert any(entry.name == "failing" for entry in info.traceback)  # a bug keeps its whole traceback
    _assert_host_untouched(before, flux_refs)


def test_runs_inside_inference_mode_like_a_comfyui_node(ws, tokenizer_dirs, tmp_path):
    with torch.inference_mode():
        result = train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=2), SilentReporter())
        assert torch.is_inference_mode_enabled()
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_a_given_device_is_never_made_current(ws, tokenizer_dirs, tmp_path, monkeypatch):
    def refuse(*args):
        raise AssertionError("torch.cuda.set_device called although a device was given")

    monkeypatch.setattr(torch.cuda, "set_device", refuse)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU host
    assert train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=1), SilentReporter()).steps == 1


# ------------------------------------------------------------------------------------------------ cancel


def _phase_reached(name: str, done: int = 0):
    return lambda events: any(isinstance(e, Phase) and e.name == name and e.done >= done for e in events)


@pytest.mark.parametrize("phase", ["caching latents", "caching text-encoder outputs"])
def test_a_stop_during_caching_ends_before_training_and_keeps_the_caches(tokenizer_dirs, tmp_path, phase,
                                                                         flux_refs):
    ws = make_workspace(tmp_path / "ws")
    disk = dict(cache_latents_to_disk=True, cache_text_encoder_outputs_to_disk=True, vae_batch_size=3,
                text_encoder_batch_size=3, cache_dir=str(tmp_path / "cache"))
    reporter = StopWhen(_phase_reached(phase, done=3))  # after the first chunk of 3 images
    with pytest.raises(Stopped, match=f"while {phase}"):
        train(config(ws, tokenizer_dirs, tmp_path / "out", max_train_steps=2, **disk), reporter)
    assert not flux_refs, "the transformer was loaded although the run stopped while caching"
    assert not reporter.of(StepEnd) and not list((tmp_path / "out").glob("*.safetensors"))
    pattern = "*_flux.npz" if phase == "caching latents" else "*_flux_te.npz"
    written = sorted((tmp_path / "cache").rglob(pattern))
    assert len(written) == 3, "the first chunk's caches are kept, and nothing after it was encoded"
    assert not list(ws["root"].joinpath("dataset").glob("*.npz")), "the image folder was written to"
    # the next run reuses what was cached: it encodes only the rest
    rerun = SilentReporter()
    train(config(ws, tokenizer_dirs, tmp_path / "out", max_train_steps=1, **disk), rerun)
    progress = [e for e in rerun.of(Phase) if e.name == phase and e.total]
    assert progress and progress[-1].total == 8 - 3


def test_a_stop_while_loading_the_transformer_is_a_clean_stopped(ws, tokenizer_dirs, tmp_path, flux_refs):
    with pytest.raises(Stopped, match="loading the transformer"):
        train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=2),
              StopWhen(_phase_reached("loading the transformer")))
    gc.collect()
    assert all(ref() is None for ref in flux_refs)


def test_a_stop_saves_lora_and_state_before_any_preview_and_skips_previews(ws, tokenizer_dirs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 2\na blue square --w 32 --h 32 --s 2\n")
    reporter = StopWhen(lambda e: _steps(e) >= 3)
    result = train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=8, sample_prompts=str(prompts),
                          sample_every_n_steps=2), reporter)
    assert result.stopped_early and result.steps == 3
    stop_index = next(i for i, e in enumerate(reporter.events) if isinstance(e, StepEnd) and e.step == 3)
    before, after = reporter.events[:stop_index], reporter.events[stop_index + 1:]
    assert [e.step for e in before if isinstance(e, Samples)] == [2]  # the cadence ran until the stop
    assert not [e for e in after if isinstance(e, Samples)], "previews were rendered after the stop"
    assert [(e.kind, e.step) for e in after if isinstance(e, Saved)] == [("lora", 3), ("state", 3)]
    assert (tmp_path / "test_lora.safetensors").is_file() and (tmp_path / "test_lora-state").is_dir()


def test_a_stop_between_preview_prompts_renders_no_more(ws, tokenizer_dirs, tmp_path, monkeypatch):
    from trainer import loop

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i} --w 32 --h 32 --s 2\n" for i in range(4)))
    rendered = []
    original = loop.generate

    def generate(*args, **kwargs):
        rendered.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "generate", generate)
    reporter = StopWhen(lambda e: len(rendered) >= 2)  # asked while the first previews render
    with pytest.raises(Stopped, match="before the first training step"):
        train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=4, sample_prompts=str(prompts),
                     sample_at_first=True), reporter)
    assert len(rendered) == 2
    assert len(reporter.of(Samples)) == 1 and len(reporter.of(Samples)[0].paths) == 2


def test_bad_inputs_fail_in_a_second_before_any_model_loads(ws, tokenizer_dirs, tmp_path, monkeypatch):
    loaded = []
    for name in ("load_autoencoder", "load_clip_l", "load_t5xxl", "load_flux"):
        monkeypatch.setattr(session_module, name, lambda *a, _n=name, **k: loaded.append(_n))
    bad = tmp_path / "prompts.json"  # (a bad flag value in a .txt line is a warning, as sd-scripts ignores it)
    bad.write_text('[{"prompt": "a prompt", "width": "notanumber"}]')
    with pytest.raises(PromptFileError, match=f"{bad}: prompt 1: width 'notanumber' is not a whole number"):
        train(config(ws, tokenizer_dirs, tmp_path, sample_prompts=str(bad)), SilentReporter())
    assert not loaded

"""Validation loss on the held-out images: fixed sigmas and noise (the same weights give the same value), sensitive to
the weights, limited by max_validation_steps, and invisible to training (random states, train/eval modes, and the
LoRA a run trains are the same with and without it)."""

import random
from dataclasses import replace

import pytest
import torch

from trainer import loop as loop_module
from trainer import step as step_module
from trainer.data import build_validation_datasets
from trainer.distributed import World
from trainer.events import SilentReporter
from trainer.flow import FlowConfig
from trainer.loop import Loop, train
from trainer.session import dataset_configs, prepare
from trainer.validation import VALIDATION_SIGMAS, ValidationSchedule, Validator

from trainspace import config, make_workspace

# encoded every step (no caches): the validation batches need the autoencoder and the text encoders too
OPTIONS = dict(validation_split=0.25, cache_latents=False, cache_text_encoder_outputs=False)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"), batch_size=1)


def with_validation(session):
    return replace(session, validation_datasets=build_validation_datasets(
        dataset_configs(session.config, session.world), session.seed))


@pytest.fixture(scope="module")
def session(ws, tokenizer_dirs, tmp_path_factory):
    cfg = config(ws, tokenizer_dirs, tmp_path_factory.mktemp("out"), **OPTIONS)
    return with_validation(prepare(cfg, SilentReporter(), World(), torch.device("cpu")))


@pytest.mark.parametrize("sampling", ["sigma", "flux_shift", "uniform"])
def test_each_pass_noises_at_exactly_the_fixed_sigmas(session, monkeypatch, sampling):
    """Whatever the training's sampling, every validation batch is noised at exactly 0.2, 0.4, 0.6 and 0.8."""
    import trainer.flow as flow_module

    seen = []
    original = flow_module.noisy_latents

    def recording(latents, noise, sigmas):
        seen.append(sigmas.clone())
        return original(latents, noise, sigmas)

    monkeypatch.setattr(flow_module, "noisy_latents", recording)
    validator = Validator.from_session(session)
    validator.context = replace(validator.context, flow=FlowConfig(timestep_sampling=sampling))
    validator.loss()
    assert len(seen) == validator.steps * len(VALIDATION_SIGMAS)
    for k, sigmas in enumerate(seen):
        assert torch.equal(sigmas, torch.full_like(sigmas, VALIDATION_SIGMAS[k % len(VALIDATION_SIGMAS)]))


def test_counts_of_the_split(session):
    assert sum(len(d.items) for d in session.datasets.datasets) == 6
    assert sum(len(d.items) for d in session.validation_datasets.datasets) == 2
    assert session.steps_per_epoch == 6  # the held-out images are not trained


def test_validation_loss_is_deterministic_and_leaves_no_trace(session):
    validator = Validator.from_session(session)
    assert validator.steps == 2
    session.network.train()
    session.flux.train()
    models = [m for m in (session.flux, session.network, session.clip_l, session.t5) if isinstance(m, torch.nn.Module)]
    modes = [(sub, sub.training) for m in models for sub in m.modules()]
    assert {mode for _, mode in modes} == {True, False}  # a mixture (encoders kept in eval inside their wrappers)
    torch.manual_seed(7)
    random.seed(7)
    before = torch.random.get_rng_state().clone(), random.getstate()
    first, second = validator.loss(), validator.loss()
    assert first == second and first > 0
    assert torch.equal(torch.random.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert all(sub.training == mode for sub, mode in modes)


def test_validation_datasets_can_be_cached_like_training_ones(session):
    from trainer.data import cache_latents, cache_text_outputs

    group = build_validation_datasets(dataset_configs(session.config, session.world), session.seed)
    cache_latents(group, session.ae, to_disk=False)
    cache_text_outputs(group, session.clip_l, session.t5, to_disk=False)
    batch = group.batch(0)
    assert batch.latents is not None and batch.text is not None and batch.images is None
    validator = Validator(Validator.from_session(session).context, group, seed=5, max_steps=1)
    assert validator.loss() == validator.loss() > 0


def test_validation_loss_follows_the_weights(session):
    validator = Validator.from_session(session)
    before = validator.loss()
    saved = {k: v.clone() for k, v in session.network.state_dict().items()}
    try:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            for name, parameter in session.network.named_parameters():
                if "up" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        assert validator.loss() != before
    finally:
        session.network.load_state_dict(saved)
    assert validator.loss() == before


def test_every_batch_is_evaluated_at_the_fixed_sigmas(session, monkeypatch):
    calls = []
    original = step_module.loss

    def spy(ctx, batch, step, sigma=None):
        calls.append((sigma, tuple(batch.paths), step, ctx.seed))
        return original(ctx, batch, step, sigma=sigma)

    monkeypatch.setattr(step_module, "loss", spy)
    Validator.from_session(session).loss()
    assert len(calls) == 2 * len(VALIDATION_SIGMAS)
    assert [c[0] for c in calls[:4]] == list(VALIDATION_SIGMAS)
    held = {i.path for d in session.validation_datasets.datasets for i in d.items}
    assert {p for c in calls for p in c[1]} == held
    assert {c[3] for c in calls} == {session.seed}  # no validation_seed: the training seed


def test_max_validation_steps_and_validation_seed(session):
    changed = replace(session, config=session.config.with_flags(max_validation_steps=1, validation_seed=99))
    validator = Validator.from_session(changed)
    assert validator.steps == 1 and validator.seed == 99


def test_no_validator_without_held_out_images(session):
    assert Validator.from_session(replace(session, validation_datasets=None)) is None


def test_schedule_is_sd_scripts():
    by_default = ValidationSchedule()
    assert not by_default.at_step(10) and all(by_default.at_epoch_end(e) for e in (1, 2, 3))
    every = ValidationSchedule(every_n_steps=4, every_n_epochs=2)
    assert [s for s in range(1, 13) if every.at_step(s)] == [4, 8, 12]
    assert [e for e in range(1, 6) if every.at_epoch_end(e)] == [2, 4]


class ValidatingLoop(Loop):
    """The loop with a validation after every optimizer step (as the lead wires it, at its cadence)."""
    losses_seen: list = []

    def __init__(self, session, reporter, *rest):
        super().__init__(with_validation(session), reporter, *rest)

    def _after_step(self, epoch_number):
        ValidatingLoop.losses_seen.append(self.validator.loss())
        super()._after_step(epoch_number)


def test_training_with_validation_trains_the_same_lora(ws, tokenizer_dirs, tmp_path, monkeypatch):
    options = dict(OPTIONS, max_train_steps=4, network=config(ws, tokenizer_dirs, tmp_path).network.__class__(
        network_dim=4, network_alpha=4, network_train_unet_only=True, network_dropout=0.1))
    plain = train(config(ws, tokenizer_dirs, tmp_path / "plain", **options), SilentReporter())
    monkeypatch.setattr(loop_module, "Loop", ValidatingLoop)
    ValidatingLoop.losses_seen = []
    validated = train(config(ws, tokenizer_dirs, tmp_path / "validated", **options), SilentReporter())
    assert len(ValidatingLoop.losses_seen) == 4 and len(set(ValidatingLoop.losses_seen)) == 4
    assert plain.losses == validated.losses
    assert plain.state_dict.keys() == validated.state_dict.keys()
    assert all(torch.equal(plain.state_dict[k], validated.state_dict[k]) for k in plain.state_dict)

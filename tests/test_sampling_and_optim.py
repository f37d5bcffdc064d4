"""Prompt files and flags, sample file names, the Euler sampler; optimizers and schedules by sd-scripts' names."""

import json
from datetime import datetime

import pytest
import torch

from trainer.config import ConfigError
from trainer.models.autoencoder import AutoEncoderParams
from trainer.optim import create_optimizer, lr_lambda, parse_optimizer_args, warmup_steps
from trainer.sampling import PromptFileError, SamplePrompt, generate, parse_prompt_line, read_prompts, sample_filename


def test_prompt_line_flags():
    p = parse_prompt_line("a cat, sitting --w 768 --h 512 --d 42 --s 28 --g 3.0 --l 4.0 --n blurry, ugly", 3)
    assert p == SamplePrompt("a cat, sitting", "blurry, ugly", 768, 512, 28, 3.0, 4.0, 42, 3)
    assert p.warning is None
    assert parse_prompt_line("plain") == SamplePrompt("plain")
    bad = parse_prompt_line("x --w big")  # sd-scripts ignores a value its pattern does not match; we say so
    assert bad == SamplePrompt("x") and "--w big" in bad.warning


def test_prompt_files_txt_toml_json(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\n\nfirst --s 4\nsecond\n")
    assert [p.prompt for p in read_prompts(tmp_path / "p.txt")] == ["first", "second"]
    (tmp_path / "p.toml").write_text('[[prompt]]\nprompt = "a"\nwidth = 256\nsample_steps = 5\n'
                                     '[[prompt]]\nprompt = "b"\n'
                                     'negative_prompt = "n"\nscale = 2.0\nguidance_scale = 1.5\nseed = 3\n')
    toml = read_prompts(tmp_path / "p.toml")
    assert toml[0].width == 256 and toml[0].steps == 5 and toml[1] == SamplePrompt("b", "n", guidance=1.5, scale=2.0,
                                                                                   seed=3, index=1)
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "j", "height": 128}]))
    assert read_prompts(tmp_path / "p.json")[0].height == 128
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "j", "hieght": 128}]))
    assert "hieght" in read_prompts(tmp_path / "bad.json")[0].warning  # sd-scripts ignores unknown keys; we warn
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "j", "height": "128"}]))
    with pytest.raises(PromptFileError, match="height '128'"):
        read_prompts(tmp_path / "bad.json")
    (tmp_path / "p.yaml").write_text("prompt: x")
    with pytest.raises(PromptFileError, match="expected a .txt"):
        read_prompts(tmp_path / "p.yaml")


def test_sample_file_names():
    now = datetime(2026, 11, 27, 9, 8, 7)
    assert sample_filename("my", 2, 42, step=150, now=now) == "my_000150_02_20261127090807_42.png"
    assert sample_filename("my", 0, None, epoch=3, now=now) == "my_e000003_00_20261127090807.png"
    assert sample_filename(None, 1, 5, step=0, now=now) == "000000_01_20261127090807_5.png"


def test_euler_sampler_integrates_the_velocity(golden):
    """With a model whose velocity is constant, Euler from pure noise lands exactly at noise - velocity."""
    from trainer.flow import pack_latents
    from trainer.models import load_flux

    class ConstantVelocity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.params = load_flux(golden / "flux_tiny_weights.safetensors").params
            self.v = torch.randn(1, 16, 4, 4)

        def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance, mask):
            return pack_latents(self.v)

    class Identity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        params = AutoEncoderParams()  # FLUX's: 8x down, 16 channels

        def decode(self, z):
            self.seen = z
            return torch.zeros(1, 3, 32, 32)

    model, ae = ConstantVelocity(), Identity()
    cond = (torch.zeros(1, 32), torch.zeros(1, 3, 48), None)
    generate(model, ae, cond, SamplePrompt("x", width=32, height=32, steps=5, seed=9))
    noise = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(ae.seen, noise - model.v, atol=1e-5)


def _tiny_models():
    from trainer.models.autoencoder import AutoEncoder
    from trainer.models.flux import Flux
    from trainer.models.tiny import TINY_AE, TINY_FLUX, ae_state_dict, flux_state_dict

    flux, ae = Flux(TINY_FLUX), AutoEncoder(TINY_AE)
    flux.load_state_dict(flux_state_dict(seed=1), assign=True)
    ae.load_state_dict(ae_state_dict(seed=2), assign=True)
    return flux.eval(), ae.eval()


@torch.no_grad()
def _three_forward_cfg_reference(flux, ae, cond, prompt, negative):
    """The sampler as it was before: the negative velocity computed twice per step (3 forwards), kept here to show
    the 2-forward sampler renders the same image."""
    import numpy as np

    from trainer.flow import image_ids, pack_latents, sampling_schedule, text_ids, unpack_latents

    h, w = prompt.height // 8, prompt.width // 8
    x = pack_latents(torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(prompt.seed)))
    ids, guidance = image_ids(1, h, w), torch.full((1,), prompt.guidance)
    schedule = sampling_schedule(prompt.steps, (h // 2) * (w // 2), shift=flux.params.guidance_embed)

    def velocity(c, t):
        pooled, txt, mask = c
        return flux(x, ids, txt, text_ids(1, txt.shape[1]), torch.full((1,), t), pooled, guidance, mask).float()

    for t, t_next in zip(schedule[:-1], schedule[1:]):
        v = velocity(cond, t)
        v = velocity(negative, t) + prompt.scale * (v - velocity(negative, t))
        x = x + (t_next - t) * v
    pixels = ae.decode(unpack_latents(x, h, w)).float().clamp(-1, 1)
    return ((pixels[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)


def test_a_negative_prompt_costs_one_forward_per_step_and_renders_the_same_image():
    """Classifier-free guidance: 2 transformer forwards per sampling step (prompt, negative prompt), not 3, and the
    image equals the one the 3-forward sampler rendered."""
    import numpy as np

    flux, ae = _tiny_models()
    calls = []
    flux.register_forward_hook(lambda module, args, output: calls.append(args[2].shape))
    g = torch.Generator().manual_seed(3)
    cond = (torch.randn(1, 64, generator=g), torch.randn(1, 5, 32, generator=g), None)
    negative = (torch.randn(1, 64, generator=g), torch.randn(1, 7, 32, generator=g), None)
    prompt = SamplePrompt("x", "blurry", width=32, height=48, steps=4, guidance=3.5, scale=4.0, seed=11)
    image = np.asarray(generate(flux, ae, cond, prompt, negative))
    assert len(calls) == 2 * prompt.steps
    assert [shape[1] for shape in calls[:2]] == [5, 7]  # the prompt, then the negative prompt
    calls.clear()
    reference = _three_forward_cfg_reference(flux, ae, cond, prompt, negative)
    assert len(calls) == 3 * prompt.steps
    assert image.shape == (48, 32, 3) and np.array_equal(image, reference) and image.std() > 0


def test_optimizer_args_are_python_literals():
    assert parse_optimizer_args(["relative_step=False", "betas=(0.9, 0.99)", "eps=1e-8", "mode=fast"]) == {
        "relative_step": False, "betas": (0.9, 0.99), "eps": 1e-8, "mode": "fast"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_optimizer_args(["relative_step"])


@pytest.mark.parametrize("name,cls", [("", "AdamW"), ("AdamW", "AdamW"), ("adamw8bit", "AdamW8bit"), ("Lion", "Lion"),
                                      ("SGDNesterov", "SGD"), ("Adafactor", "Adafactor"),
                                      ("torch.optim.RMSprop", "RMSprop")])
def test_optimizers_by_name(name, cls):
    param = torch.nn.Parameter(torch.randn(8, 8))
    args = {"relative_step": False} if name == "Adafactor" else {}
    optimizer = create_optimizer(name, [{"params": [param], "lr": 1e-3}], 1e-3, args)
    assert type(optimizer).__name__ == cls
    param.grad = torch.ones_like(param)
    before = param.detach().clone()
    optimizer.step()
    assert not torch.equal(before, param)
    if name == "SGDNesterov":
        assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.9


def test_adafactor_relative_step_owns_the_lr():
    param = torch.nn.Parameter(torch.randn(8, 8))
    optimizer = create_optimizer("Adafactor", [{"params": [param], "lr": 1e-3}], 1e-3, {})
    assert optimizer.param_groups[0]["lr"] is None and optimizer.param_groups[0]["relative_step"]


def test_schedules():
    assert [lr_lambda("constant_with_warmup", 4, 20)(s) for s in (0, 2, 4, 10)] == [0, 0.5, 1, 1]
    linear = lr_lambda("linear", 0, 10)
    assert [linear(s) for s in (0, 5, 10)] == [1, 0.5, 0]
    cosine = lr_lambda("cosine", 0, 10)
    assert cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0)
    restarts = lr_lambda("cosine_with_restarts", 0, 12, num_cycles=3)
    assert restarts(4) == pytest.approx(1.0) and restarts(2) == pytest.approx(0.5)
    poly = lr_lambda("polynomial", 0, 10, power=2.0)
    assert poly(5) == pytest.approx((1 - 1e-7) * 0.25 + 1e-7)
    assert warmup_steps(0.1, 200) == 20 and warmup_steps(7, 200) == 7
    with pytest.raises(ConfigError):
        lr_lambda("nope", 0, 1)


def test_previews_take_the_latent_size_from_the_autoencoder():
    """An autoencoder with 2 downsampling levels (like the reference one in tests/reference/golden/) renders a preview
    of the asked size: the latent grid is the image size over the autoencoder's own downscale, not over 8."""
    from trainer.models.autoencoder import AutoEncoder
    from trainer.models.flux import Flux
    from trainer.models.tiny import TINY_FLUX, ae_state_dict, flux_state_dict
    from trainer.sampling import SamplePrompt, generate

    shallow = AutoEncoderParams(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    assert shallow.downscale == 2
    flux, ae = Flux(TINY_FLUX), AutoEncoder(shallow)
    flux.load_state_dict(flux_state_dict(seed=1), assign=True)
    ae.load_state_dict(ae_state_dict(shallow, seed=2), assign=True)
    seen = []
    flux.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    cond = (torch.zeros(1, TINY_FLUX.vec_in_dim), torch.zeros(1, 3, TINY_FLUX.context_in_dim), None)
    image = generate(flux.eval(), ae.eval(), cond, SamplePrompt("x", width=40, height=24, steps=2, seed=3))
    assert image.size == (40, 24)
    assert seen[0] == (1, (24 // 4) * (40 // 4), TINY_FLUX.in_channels)  # packed 2x2 latents of a 12x20 grid

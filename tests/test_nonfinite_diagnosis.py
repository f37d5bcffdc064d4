"""The NaN stop names what is actually unusual in the run's settings (trainer/nonfinite_diagnosis.py), most specific
first, instead of always blaming the learning rate."""

import pytest

from trainer.config import LoRAConfig, TrainConfig
from trainer.nonfinite_diagnosis import NonFiniteFacts, describe, likely_causes

FILES = dict(pretrained_model_name_or_path="flux.safetensors", clip_l="clip_l.safetensors", t5xxl="t5.safetensors",
             ae="ae.safetensors", train_data_dir="images")
USUAL = dict(learning_rate=1e-4, network=LoRAConfig(network_dim=16, network_alpha=16))


def config(**overrides) -> TrainConfig:
    return TrainConfig.from_flags(**{**FILES, **USUAL, **overrides})


def test_full_fp16_with_adamw_blames_the_fp16_moments_not_the_learning_rate():
    causes = likely_causes(config(mixed_precision="fp16", full_fp16=True), NonFiniteFacts("weights", loss=0.3))
    assert causes[0].startswith("full_fp16 keeps the LoRA weights, and so AdamW's moments, in fp16: eps (1e-8) rounds "
                                "to 0")
    assert "the learning rate is not the cause" in causes[0] and "--mixed_precision bf16 (with --full_bf16" in causes[0]
    assert len(causes) == 1 and not any("learning_rate" in c or "learning rate too high" in c for c in causes)


def test_full_fp16_with_an_optimizer_keeping_its_state_elsewhere_is_not_blamed_on_the_moments():
    causes = likely_causes(config(mixed_precision="fp16", full_fp16=True, optimizer_type="AdamW8bit"),
                           NonFiniteFacts("gradients", loss=0.3, batch_files=("/d/a.png",)))
    assert not any("moments" in c for c in causes) and causes[0].startswith("fp16 overflow")


def test_alpha_far_above_the_rank_is_named():
    causes = likely_causes(config(network=LoRAConfig(network_dim=4, network_alpha=4096)),
                           NonFiniteFacts("loss", loss=float("nan"), batch_files=("/d/a.png", "/d/b.png")))
    assert causes == ["network_alpha 4096 over rank 4 multiplies the LoRA's output by 1024 (alpha = rank gives 1, the "
                      "usual is 1 or below)", "a broken image or cached latent in this batch (a.png, b.png)"]


def test_starting_weights_and_merged_base_weights_are_named():
    causes = likely_causes(config(network_weights="/loras/old.safetensors", base_weights=("/l/a.safetensors",),
                                  base_weights_multiplier=(2.5,)), NonFiniteFacts("weights", loss=0.2))
    assert causes[0].startswith("the LoRA starts from --network_weights old.safetensors")
    assert causes[1].startswith("--base_weights merged into the transformer (a.safetensors x2.5;")


@pytest.mark.parametrize("overrides, named", [
    (dict(learning_rate=0.05), "a learning rate too high (0.05) for AdamW (usually 1e-4 to 1e-3 for a FLUX.1 LoRA)"),
    (dict(unet_lr=0.01), "unet_lr too high (0.01) for AdamW (usually 1e-4 to 1e-3 for a FLUX.1 LoRA)"),
    (dict(text_encoder_lr=(1e-4, 0.2)), "text_encoder_lr[1] too high (0.2) for AdamW (usually 1e-4 to 1e-3 for a "
                                        "FLUX.1 LoRA)"),
    (dict(optimizer_type="Prodigy", learning_rate=50.0), "a learning rate too high (50) for Prodigy (usually a "
                                                          "multiplier around 1.0)"),
])
def test_a_high_learning_rate_is_named_for_its_optimizer(overrides, named):
    causes = likely_causes(config(**overrides), NonFiniteFacts("weights", loss=0.2))
    assert causes == [named]


def test_a_learning_rate_free_optimizer_at_its_usual_multiplier_is_not_blamed():
    causes = likely_causes(config(optimizer_type="DAdaptAdam", learning_rate=1.0), NonFiniteFacts("weights", 0.2))
    assert causes == ["a learning rate too high for this data (1), though it is in the usual range"]


def test_weight_rescaling_and_clipping_are_named_after_the_optimizer_step():
    c = config(scale_weight_norms=1.0, max_grad_norm=0.0)
    after = likely_causes(c, NonFiniteFacts("weights", loss=0.2))
    assert after == ["--scale_weight_norms 1 rescales the LoRA after every step",
                     "gradient clipping is off (--max_grad_norm 0), so one large gradient reaches the weights whole"]
    before = likely_causes(c, NonFiniteFacts("gradients", loss=0.2))
    assert before == ["a broken image or cached latent in this batch (its files are not known)"]


def test_nothing_unusual_gives_one_honest_sentence():
    text = describe(config(), NonFiniteFacts("weights", loss=0.2))
    assert text == "Likely causes: a learning rate too high for this data (0.0001), though it is in the usual range."


def test_facts_name_their_stage():
    with pytest.raises(ValueError, match="stage: expected one of loss, gradients, weights"):
        NonFiniteFacts("step")

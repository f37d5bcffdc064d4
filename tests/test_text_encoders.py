"""CLIP-L and T5-XXL load from the distributed single-file layouts and compute what transformers computes."""

import pytest
import torch
from safetensors.torch import load_file

from trainer.models import load_clip_l, load_t5xxl
from trainer.models.text_encoders import clip_config_from_shapes, t5_config_from_shapes
from trainer.models.tiny import write_t5xxl

PROMPTS = ["a photo of a cat wearing a tiny hat", "sks dog, watercolor"]


@pytest.fixture(scope="module")
def clip(tiny_files, tokenizer_dirs):
    return load_clip_l(tiny_files["clip_l"], dtype=torch.float32, tokenizer=tokenizer_dirs["clip_l"])


@pytest.fixture(scope="module")
def t5(tiny_files, tokenizer_dirs):
    return load_t5xxl(tiny_files["t5xxl"], dtype=torch.float32, tokenizer=tokenizer_dirs["t5xxl"])


def transformers_reference(cls, config, state):
    model = cls(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k or "embed_tokens" in k for k in missing)
    return model


def test_clip_l_file_layout_is_the_distributed_one(tiny_files):
    keys = load_file(tiny_files["clip_l"]).keys()
    assert "text_model.encoder.layers.1.mlp.fc1.weight" in keys
    assert "text_model.embeddings.token_embedding.weight" in keys


def test_clip_l_pooled_output_matches_transformers(tiny_files, clip):
    from transformers import CLIPTextConfig, CLIPTextModel

    state = {k.removeprefix("text_model."): v for k, v in load_file(tiny_files["clip_l"]).items()
             if k.startswith("text_model.")}
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, hidden_act="quick_gelu", eos_token_id=49407)
    reference = transformers_reference(CLIPTextModel, cfg, state)
    ids = clip.tokenize(PROMPTS)
    with torch.no_grad():
        expected = reference(input_ids=ids).pooler_output
        pooled = clip(ids)
    assert pooled.shape == (2, 64)
    assert torch.allclose(pooled, expected, atol=1e-5)
    with torch.no_grad():  # pooled = final hidden state at the first end-of-text token
        hidden = reference(input_ids=ids).last_hidden_state
    first_eos = (ids == 49407).int().argmax(-1)
    assert torch.allclose(pooled, hidden[torch.arange(2), first_eos], atol=1e-6)


def test_clip_l_is_configured_as_clip_l():
    shapes = {"embeddings.token_embedding.weight": (49408, 768), "embeddings.position_embedding.weight": (77, 768),
              **{f"encoder.layers.{i}.mlp.fc1.weight": (3072, 768) for i in range(12)}}
    cfg = clip_config_from_shapes(shapes)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers,
            cfg.intermediate_size) == (768, 12, 12, 3072)
    assert cfg.hidden_act == "quick_gelu" and cfg.eos_token_id == 49407


def test_clip_tokens_are_padded_and_truncated_to_77(clip):
    ids = clip.tokenize(["short", "word " * 200])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == 49406 and (ids[0, 2:] == 49407).all()  # start, "short", then end-of-text padding
    assert ids[1, -1] == 49407 and (ids[1, 1:-1] != 49407).all()  # truncated, still ends with end-of-text


def test_t5_matches_transformers_with_and_without_mask(tiny_files, t5):
    from transformers import T5Config, T5EncoderModel

    state = load_file(tiny_files["t5xxl"])
    cfg = T5Config(vocab_size=32128, d_model=32, d_kv=16, num_heads=2, d_ff=64, num_layers=2,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    reference = transformers_reference(T5EncoderModel, cfg, {k: v.float() for k, v in state.items()})
    ids, mask = t5.tokenize(PROMPTS, max_length=32)
    with torch.no_grad():
        plain = t5(ids)
        masked = t5(ids, mask)
        assert torch.allclose(plain, reference(input_ids=ids).last_hidden_state, atol=1e-5)
        assert torch.allclose(masked, reference(input_ids=ids, attention_mask=mask).last_hidden_state, atol=1e-5)
    assert plain.shape == (2, 32, 32)
    assert not torch.allclose(plain, masked, atol=1e-4)


def test_t5_pads_to_max_length_and_returns_the_mask(t5):
    ids, mask = t5.tokenize(PROMPTS)
    assert ids.shape == mask.shape == (2, 512)  # the dev default
    real = mask.sum(-1)
    assert (ids[torch.arange(2), real - 1] == 1).all()  # each prompt ends with </s>
    assert (ids[mask == 0] == 0).all()  # then <pad>
    hidden, mask_out = t5.encode(PROMPTS, apply_attention_mask=False)
    assert hidden.shape == (2, 512, 32) and torch.equal(mask_out, mask)


def test_t5_length_for_schnell(tiny_files, tokenizer_dirs):
    schnell = load_t5xxl(tiny_files["t5xxl"], tokenizer=tokenizer_dirs["t5xxl"], max_length=256)
    assert schnell.tokenize("x")[0].shape == (1, 256)


def test_t5_is_configured_as_t5_v1_1_xxl():
    shapes = {"shared.weight": (32128, 4096),
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64),
              "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
              **{f"encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight": (10240, 4096) for i in range(24)}}
    cfg = t5_config_from_shapes(shapes)
    assert (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_layers) == (4096, 64, 64, 10240, 24)
    assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new"


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_t5_fp8_file_loads_cast_or_kept(tmp_path, tokenizer_dirs, fp8):
    path = write_t5xxl(tmp_path / "t5xxl_fp8.safetensors", dtype=fp8)
    cast = load_t5xxl(path, tokenizer=tokenizer_dirs["t5xxl"], max_length=16)
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}  # fp8 files compute in bf16 by default
    kept = load_t5xxl(path, dtype=torch.float32, tokenizer=tokenizer_dirs["t5xxl"], max_length=16, fp8=True)
    assert kept.model.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.dtype == fp8
    full = load_t5xxl(path, dtype=torch.float32, tokenizer=tokenizer_dirs["t5xxl"], max_length=16)
    with torch.no_grad():
        a, _ = kept.encode(PROMPTS)
        b, _ = full.encode(PROMPTS)
    assert torch.allclose(a, b, atol=1e-5)


def test_tokenizer_folder_errors_name_the_folder(tiny_files, tmp_path):
    clip = load_clip_l(tiny_files["clip_l"], tokenizer=tmp_path / "no_tokenizer_here")
    (tmp_path / "no_tokenizer_here").mkdir()
    with pytest.raises(ValueError, match="no_tokenizer_here.*vocab.json"):
        clip.tokenize("x")


def test_generated_demo_tokenizers_fit_the_tiny_models(tiny_files, tmp_path):
    from trainer.models.tiny_tokenizers import write_tokenizers

    folders = write_tokenizers(tmp_path)
    clip = load_clip_l(tiny_files["clip_l"], tokenizer=folders["clip_l"])
    t5 = load_t5xxl(tiny_files["t5xxl"], dtype=torch.float32, tokenizer=folders["t5xxl"], max_length=64)
    with torch.no_grad():
        a, b = clip.encode(PROMPTS)
        hidden, mask = t5.encode(PROMPTS)
    assert not torch.allclose(a, b) and hidden.shape == (2, 64, 32) and 0 < mask[1].sum() < 64

"""The toy FLUX family's parts that need no pretrained weights: the procedural pictures and captions, the
pretraining script end to end on a few steps, and a clear error where the pretrained weights are missing."""

import json

import pytest
import torch
from PIL import ImageChops
from safetensors import safe_open

from trainer.errors import ModelFileError
from trainer.models.autoencoder import AutoEncoder
from trainer.models.loading import load_autoencoder, load_flux, load_t5xxl
from trainer.toy import pretrain, shapes
from trainer.toy.models import T5_MAX_LENGTH, TOY_AE, TOY_FLUX, write_text_encoders, write_toy_model_set


def differs(a, b) -> bool:
    return ImageChops.difference(a, b).getbbox() is not None


def test_pictures_are_reproducible_and_named_by_their_captions():
    assert not differs(shapes.named("red", "star", "white", seed=3), shapes.named("red", "star", "white", seed=3))
    assert differs(shapes.named("red", "star", "white", seed=3), shapes.named("red", "star", "white", seed=4))
    star, circle = shapes.named("red", "star", "white", 0, jitter=False), shapes.named("red", "circle", "white", 0,
                                                                                         jitter=False)
    assert star.getpixel((16, 16)) == circle.getpixel((16, 16)) == shapes.COLOURS["red"]  # both centred
    assert star.getpixel((16, 6)) == shapes.COLOURS["red"] and star.getpixel((8, 16)) == shapes.BACKGROUNDS["white"]
    assert circle.getpixel((8, 16)) == shapes.COLOURS["red"]  # a star's notch is background, a circle's inside
    assert shapes.caption("red", "circle", "white") == "a red circle on a white background"


def test_pretraining_set_covers_every_caption_and_never_the_new_shape():
    data = shapes.pretraining_set(variants=2)
    captions = {caption for _, caption in data}
    assert len(data) == 2 * len(captions) == 2 * len(shapes.COLOURS) * len(shapes.KNOWN_SHAPES) * len(
        shapes.BACKGROUNDS)
    assert not any(shapes.NEW_SHAPE in caption for caption in captions)
    assert {image.size for image, _ in data} == {(shapes.SIZE, shapes.SIZE)}


def test_skip_init_makes_every_residual_block_the_identity():
    ae = pretrain.skip_init(AutoEncoder(TOY_AE))
    block = ae.encoder.down[0].block[0]
    x = torch.randn(1, TOY_AE.ch, 8, 8)
    assert torch.equal(block(x), x)


def test_toy_model_set_says_which_weights_are_missing(tmp_path):
    with pytest.raises(ModelFileError, match=r"flux\.safetensors: no such file; expected the pretrained toy flux "
                                             r"weights, which `python -m trainer\.toy\.pretrain` makes"):
        write_toy_model_set(tmp_path / "models", weights=tmp_path / "nothing")
    assert not (tmp_path / "models" / "flux.safetensors").exists()


def test_pretrain_script_writes_loadable_weights_with_their_provenance(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert pretrain.main(["--out", str(tmp_path), "--ae-steps", "1", "--decoder-steps", "1", "--flux-steps", "1",
                          "--variants", "1", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads  # the caller's thread count is given back
    flux = load_flux(tmp_path / "flux.safetensors", dtype=torch.float32)
    assert flux.params == TOY_FLUX
    ae = load_autoencoder(tmp_path / "ae.safetensors")
    assert ae.params.ch_mult == TOY_AE.ch_mult and ae.params.scale_factor != TOY_AE.scale_factor  # its own scale
    with safe_open(str(tmp_path / "flux.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["made_by"], meta["seed"], meta["ae_steps"], meta["decoder_steps"], meta["flux_steps"],
            meta["variants"], meta["threads"]) == ("python -m trainer.toy.pretrain", "0", "1", "1", "1", "1", "1")
    assert meta["command"] == ("python -m trainer.toy.pretrain --seed 0 --ae-steps 1 --decoder-steps 1 --flux-steps 1 "
                               "--variants 1 --threads 1")
    assert "never a star" in meta["data"]
    assert json.loads(meta["architecture"])["hidden_size"] == TOY_FLUX.hidden_size
    assert f"    {meta['command']}\n" in (tmp_path / "README.md").read_text(encoding="utf-8")
    out = capsys.readouterr().out
    assert "autoencoder step 1/1" in out and "decoder step 1/1" in out and "transformer step 1/1" in out


def test_toy_t5_sees_every_word_of_the_longest_caption(tmp_path):
    """Character-level T5 tokens: the longest caption, with its </s>, fits T5_MAX_LENGTH, so the transformer learns
    the background word too (a length of 8 cut every caption after its colour)."""
    files = write_text_encoders(tmp_path)
    t5 = load_t5xxl(files["t5xxl"], dtype=torch.float32, tokenizer=files["t5xxl_tokenizer"], max_length=T5_MAX_LENGTH)
    longest = max((shapes.caption(c, s, b) for c in shapes.COLOURS for s in (*shapes.KNOWN_SHAPES, shapes.NEW_SHAPE)
                   for b in shapes.BACKGROUNDS), key=len)
    ids, _ = t5.tokenize([longest])
    assert ids[0, -1].item() == 0  # padding after the </s>: nothing was cut
    assert t5.tokenize([longest + " on a"])[0][0, -1].item() == 0  # even a longer concept word fits

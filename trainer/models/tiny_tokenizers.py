"""Character-level tokenizers in the CLIP and T5 file formats, for the demo on a machine that has neither the real
tokenizer files nor internet access. They spell every word letter by letter: enough to tell captions apart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's table)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_clip_tokenizer(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + list(CLIP_SPECIALS)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "bos_token": CLIP_SPECIALS[0], "eos_token": CLIP_SPECIALS[1],
              "pad_token": CLIP_SPECIALS[1], "unk_token": CLIP_SPECIALS[1], "do_lower_case": True,
              "model_max_length": 77}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def write_t5_tokenizer(folder: str | os.PathLike) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces = [("▁", -2.0)] + [(chr(c), -3.0) for c in range(32, 127)] + [("▁" + chr(c), -2.5) for c in range(33, 127)]
    tok = Tokenizer(models.Unigram(specials + pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
              "extra_ids": 0, "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def write_tokenizers(folder: str | os.PathLike) -> dict[str, Path]:
    folder = Path(folder)
    return {"clip_l": write_clip_tokenizer(folder / "clip_l"), "t5xxl": write_t5_tokenizer(folder / "t5xxl")}

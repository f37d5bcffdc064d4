"""Build each model from the files people have, never holding two full copies in memory.

A model is constructed on the meta device (no memory), then each tensor is read from the file, converted and put
in place, one at a time. Layouts understood: BFL keys, any prefix around them (ComfyUI full checkpoints put the
transformer under `model.diffusion_model.`, the AE under `first_stage_model.`, the text encoders under
`text_encoders.clip_l.transformer.` ...), the diffusers FLUX transformer, fp8 weights (plain, or "scaled" with a
`scale_weight` per layer). Anything else is refused with a message naming the file, what it holds and what was
expected.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from ..device_cast import cast_on
from . import flux_diffusers
from .autoencoder import AutoEncoder, AutoEncoderParams
from .chroma import Chroma, ChromaParams
from .flux import FP8_DTYPES, Flux, FluxParams, Linear
from .formats import Component, describe, find_component
from .safetensors_file import ModelFileError, SafetensorsFile

DeviceLike = str | torch.device
# Per-layer quantisation extras of "scaled fp8" files: folded into the weights, never parameters themselves.
_FP8_EXTRAS = (".scale_weight", ".scale_input", "scaled_fp8")


class TensorSource:
    """Target key -> a function that reads and assembles that tensor, plus the target shapes (known up front).
    `scales` maps each weight of a scaled-fp8 file to its `scale_weight` key; its reader dequantizes."""

    def __init__(self, file: SafetensorsFile, readers: dict[str, Callable[[], Tensor]], shapes: dict[str, tuple],
                 scales: dict[str, str] | None = None):
        self.file = file
        self.readers = readers
        self.shapes = shapes
        self.scales = scales or {}

    @classmethod
    def prefixed(cls, file: SafetensorsFile, prefix: str, rename: Callable[[str], str] = lambda k: k) -> "TensorSource":
        readers, shapes, scales = {}, {}, {}
        for key, shape in file.shapes.items():
            if not key.startswith(prefix) or any(key.endswith(x) for x in _FP8_EXTRAS):
                continue
            target = rename(key[len(prefix):])
            scale_key = key.removesuffix("weight") + "scale_weight"
            if key.endswith(".weight") and scale_key in file.header:
                scales[target] = scale_key
            readers[target] = _reader(file, key, scales.get(target))
            shapes[target] = shape
        return cls(file, readers, shapes, scales)

    @classmethod
    def flux_from_diffusers(cls, file: SafetensorsFile, prefix: str) -> "TensorSource":
        local = {k[len(prefix):]: s for k, s in file.shapes.items() if k.startswith(prefix)}
        readers, shapes = {}, {}
        for target, recipe in flux_diffusers.recipes(list(local)).items():
            read = lambda key: _reader(file, prefix + key)()  # noqa: E731
            readers[target] = lambda r=recipe, read=read: flux_diffusers.build(r, read)
            shapes[target] = flux_diffusers.built_shape(recipe, local)
        return cls(file, readers, shapes)

    def keep_scaled(self, target: str) -> None:
        """Read `target` as stored (fp8) instead of dequantized; its scale is attached to the layer afterwards."""
        self.readers[target] = _reader(self.file, self._file_key(target))

    def _file_key(self, target: str) -> str:
        return self.scales[target].removesuffix("scale_weight") + "weight"


def _reader(file: SafetensorsFile, key: str, scale_key: str | None = None) -> Callable[[], Tensor]:
    def read() -> Tensor:
        t = file.tensor(key)
        if scale_key is not None:  # scaled fp8: stored weight * per-layer scale
            t = t.float() * file.tensor(scale_key).float()
        return t

    return read


def _set_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def materialize(model: nn.Module, source: TensorSource, dtype_for: Callable[[str, Tensor], torch.dtype],
                device: DeviceLike, ignore: tuple[str, ...] = (), convert_device: DeviceLike | None = None) -> None:
    """Fill `model` (built on meta) from `source`. Every parameter and persistent buffer must be present with the
    right shape; keys the model lacks are an error unless they end with one of `ignore`. Weights a model ties to
    another (transformers' `_tied_weights_keys`) are tied, not read twice."""
    tied = _tied_weights(model)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in tied}
    file = source.file
    missing = sorted(set(expected) - set(source.readers))
    unexpected = sorted(k for k in set(source.readers) - set(expected) - set(tied) if not k.endswith(ignore))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise file.error("does not match the model its shapes describe: " + "; ".join(detail))
    for name, param in expected.items():
        if tuple(source.shapes[name]) != tuple(param.shape):
            raise file.error(f"has '{name}' of shape {list(source.shapes[name])}, the model needs {list(param.shape)}")
        value = source.readers[name]()
        _set_tensor(model, name, cast_on(value, dtype_for(name, value), device, convert_device))
    for target, origin in tied.items():
        _set_tensor(model, target, model.get_parameter(origin))


def _tied_weights(model: nn.Module) -> dict[str, str]:
    tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, Mapping):  # transformers 5: {target: origin}
        return dict(tied)
    return {}  # transformers 4 shares the module itself, so one assignment fills both names


def _compute_dtype(file: SafetensorsFile, prefix: str, dtype: torch.dtype | None) -> torch.dtype:
    """`dtype`, else the floating type holding most of the component's bytes (fp8 files compute in bf16)."""
    if dtype is not None:
        return dtype
    totals: dict[torch.dtype, int] = {}
    for key in file.keys:
        if key.startswith(prefix) and file.dtype(key).is_floating_point:
            totals[file.dtype(key)] = totals.get(file.dtype(key), 0) + file.nbytes(key)
    most = max(totals, key=totals.get) if totals else torch.float32
    return torch.bfloat16 if most in FP8_DTYPES else most


def _open(path: str | os.PathLike, expected: str, kinds: tuple[str, ...],
          hint: str = "") -> tuple[SafetensorsFile, Component]:
    file = SafetensorsFile(path, expected)
    component = find_component(file.keys, kinds, hint)
    if component is None:
        raise file.error(f"holds {describe(file.keys)}")
    return file, component


MODEL_SLOTS = {  # option -> (what it must hold, component kinds, hint for a full checkpoint)
    "ae": ("the FLUX autoencoder (ae.safetensors)", ("ae",), "first_stage_model"),
    "clip_l": ("a CLIP-L text encoder (clip_l.safetensors)", ("clip",), "clip_l"),
    "t5xxl": ("a T5-XXL text encoder (t5xxl_fp16.safetensors)", ("t5",), "t5xxl"),
}


def check_model_file(path: str | os.PathLike, slot: str) -> None:
    """Read only the header of `path` and check it holds what `slot` (ae, clip_l, t5xxl) needs; raise
    ModelFileError naming the file, what it holds and what was expected."""
    expected, kinds, hint = MODEL_SLOTS[slot]
    _open(path, expected, kinds, hint)[0].close()


def _config_metadata(file: SafetensorsFile) -> dict:
    try:
        return json.loads(file.metadata.get("config", "{}"))
    except ValueError:
        return {}


def _finish(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ FLUX

TRANSFORMER_EXPECTED = "a FLUX.1 transformer (BFL, ComfyUI or diffusers layout) or a Chroma transformer"
MODEL_TYPES = {FluxParams: "flux", ChromaParams: "chroma"}  # --model_type of each transformer


def load_flux(path: str | os.PathLike, dtype: torch.dtype | None = None, device: DeviceLike = "cpu",
              fp8: bool | torch.dtype = False, convert_device: DeviceLike | None = None) -> Flux:
    """The FLUX.1 transformer (dev or schnell, any size) from a BFL, ComfyUI or diffusers file; from a Chroma file
    (BFL keys plus `distilled_guidance_layer.*`, bare or ComfyUI-prefixed), the Chroma transformer (a Flux).

    dtype: compute dtype of every tensor (default: the file's own; fp8 files compute in bfloat16).
    fp8: keep the Linear weights inside the blocks in fp8 (the file's fp8 type, else `torch.float8_e4m3fn`, or
    the dtype given), upcast on each call; everything else in `dtype`.
    convert_device: where a narrowing to fp8 is computed (the compute device when the model is read into host
    memory for block swap: far faster than the CPU).
    """
    file, component, source, params = _flux_source(path)
    with torch.device("meta"):
        model = build_transformer(params)
    block_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "_blocks." in n]
    _fill(model, source, _compute_dtype(file, component.prefix, dtype), _fp8_storage(file, fp8), block_linears, device,
          convert_device)
    return _finish(model)


def read_flux_params(path: str | os.PathLike) -> FluxParams | ChromaParams:
    """The transformer's sizes (dev or schnell, depth ...) from the file's header alone, without loading it;
    ChromaParams for a Chroma file."""
    return _flux_source(path)[3]


def build_transformer(params: FluxParams | ChromaParams) -> Flux:
    """The transformer `params` describe (on the current default device): Flux, or Chroma for ChromaParams."""
    return Chroma(params) if isinstance(params, ChromaParams) else Flux(params)


def model_type_of(params: FluxParams | ChromaParams) -> str:
    """The --model_type value (sd-scripts') that a transformer's params call for: flux or chroma."""
    return MODEL_TYPES[type(params)]


def check_transformer_type(path: str | os.PathLike, params: FluxParams | ChromaParams, model_type: str) -> None:
    """Refuse a transformer file that is not what --model_type says (sd-scripts loads the file as the type given,
    so a mismatch never trains there either)."""
    found = model_type_of(params)
    if found != model_type:
        what = "a Chroma transformer" if found == "chroma" else "a FLUX.1 transformer"
        raise ModelFileError(f"{path}: --pretrained_model_name_or_path holds {what}, but --model_type is "
                             f"{model_type!r}; set --model_type {found}.")


def _flux_source(path: str | os.PathLike) -> tuple[SafetensorsFile, Component, TensorSource,
                                                   FluxParams | ChromaParams]:
    file, component = _open(path, TRANSFORMER_EXPECTED, ("flux", "flux_diffusers", "chroma"))
    if component.kind == "flux_diffusers":
        source = TensorSource.flux_from_diffusers(file, component.prefix)
    else:
        source = TensorSource.prefixed(file, component.prefix)
    params_class = ChromaParams if component.kind == "chroma" else FluxParams
    try:
        params = params_class.from_shapes(source.shapes, _config_metadata(file))
    except (KeyError, ValueError) as e:
        raise file.error(f"holds {component.describe()} that cannot be built: {e}") from e
    return file, component, source, params


def _fill(model: nn.Module, source: TensorSource, compute: torch.dtype, weight_fp8: torch.dtype | None,
          fp8_layers: list[str], device: DeviceLike, convert_device: DeviceLike | None = None) -> None:
    """`materialize`, every tensor in `compute` except, with `weight_fp8`, the weights of `fp8_layers`, which stay
    in their stored fp8 type (else `weight_fp8`); a scaled-fp8 weight keeps its scale as the layer's buffer."""
    fp8_weights = {f"{name}.weight" for name in fp8_layers} if weight_fp8 else set()

    def dtype_for(name: str, value: Tensor) -> torch.dtype:
        if name in fp8_weights:
            return value.dtype if value.dtype in FP8_DTYPES else weight_fp8
        return compute

    kept_scaled = [t for t in source.scales if t in fp8_weights]
    for target in kept_scaled:
        source.keep_scaled(target)
    materialize(model, source, dtype_for, device, convert_device=convert_device)
    for target in kept_scaled:
        layer = model.get_submodule(target.removesuffix(".weight"))
        layer._buffers["weight_scale"] = source.file.tensor(source.scales[target]).float().to(device)
        layer._non_persistent_buffers_set.add("weight_scale")


def _fp8_storage(file: SafetensorsFile, fp8: bool | torch.dtype) -> torch.dtype | None:
    if isinstance(fp8, torch.dtype):
        if fp8 not in FP8_DTYPES:
            raise ValueError(f"fp8 must be True, False or one of {FP8_DTYPES}, not {fp8}")
        return fp8
    if not fp8:
        return None
    stored = {file.dtype(k) for k in file.keys} & set(FP8_DTYPES)
    return stored.pop() if len(stored) == 1 else torch.float8_e4m3fn


# ------------------------------------------------------------------------------------------ AE

def load_autoencoder(path: str | os.PathLike, dtype: torch.dtype | None = None,
                     device: DeviceLike = "cpu") -> AutoEncoder:
    """The FLUX autoencoder (`ae.safetensors`, or the `first_stage_model.` part of a ComfyUI checkpoint)."""
    expected, kinds, hint = MODEL_SLOTS["ae"]
    file, component = _open(path, expected, kinds, hint)
    source = TensorSource.prefixed(file, component.prefix)
    try:
        params = AutoEncoderParams.from_shapes(source.shapes, _config_metadata(file))
    except KeyError as e:
        raise file.error(f"holds {component.describe()} that cannot be built: {e}") from e
    if params.z_channels != 16:
        raise file.error(f"holds an autoencoder with {params.z_channels} latent channels (an SD/SDXL VAE?); "
                         "FLUX's has 16")
    compute = _compute_dtype(file, component.prefix, dtype)
    with torch.device("meta"):
        model = AutoEncoder(params)
    materialize(model, source, lambda name, value: compute, device)
    return _finish(model)


# ------------------------------------------------------------------------------------------ text encoders

def load_clip_l(path: str | os.PathLike, dtype: torch.dtype | None = None, device: DeviceLike = "cpu",
                tokenizer: str | os.PathLike | None = None):
    """CLIP-L text encoder from `clip_l.safetensors` (or a checkpoint holding one); `tokenizer` is a folder or a
    Hugging Face id (default: ComfyUI's copy when run inside ComfyUI, else openai/clip-vit-large-patch14)."""
    from .text_encoders import ClipL, build_clip_text_model

    expected, kinds, hint = MODEL_SLOTS["clip_l"]
    file, component = _open(path, expected, kinds, hint)
    source = TensorSource.prefixed(file, component.prefix)
    with torch.device("meta"):
        try:
            model = build_clip_text_model(source.shapes)
        except (KeyError, ValueError) as e:
            raise file.error(f"holds {component.describe()} that cannot be built: {e}") from e
    if any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 4 keeps that level
        source = TensorSource.prefixed(file, component.prefix, rename=lambda k: "text_model." + k)
    compute = _compute_dtype(file, component.prefix, dtype)
    materialize(model, source, lambda name, value: compute, device, ignore=("position_ids",))
    _restore_derived_buffers(model, device)
    return ClipL(_finish(model), tokenizer=tokenizer)


FP8_IF_STORED = "stored"  # load_t5xxl(fp8=...): keep the Linear weights the file stores in fp8 as they are


def t5_fp8_option(t5xxl_fp8: bool, fp8_base: bool, fp8_base_unet: bool = False) -> bool | str:
    """`load_t5xxl`'s fp8 argument for the training options: t5xxl_fp8 puts T5's Linears in fp8 whatever the file
    holds; fp8_base (without fp8_base_unet, which keeps the text encoders in the compute dtype) keeps an fp8 file's
    Linears in fp8, as sd-scripts does."""
    if t5xxl_fp8:
        return True
    return FP8_IF_STORED if fp8_base and not fp8_base_unet else False


def load_t5xxl(path: str | os.PathLike, dtype: torch.dtype | None = None, device: DeviceLike = "cpu",
               tokenizer: str | os.PathLike | None = None, max_length: int = 512,
               fp8: bool | torch.dtype | str = False):
    """T5-XXL encoder from `t5xxl_fp16.safetensors`, `t5xxl_fp8_e4m3fn.safetensors` (or a checkpoint holding one).
    `max_length`: tokens to pad/truncate to (512 for dev, 256 for schnell).

    fp8: True (or an fp8 dtype) keeps the blocks' Linear weights in fp8 (converting a 16/32-bit file);
    FP8_IF_STORED keeps those the file stores in fp8 and converts nothing; False computes everything in `dtype`.
    fp8 weights are upcast to the input's dtype for each call. Layer norms, the token embedding and the relative
    attention bias are always in `dtype`; `wo` is fp8 only when the file stores it so (never rounded here)."""
    from .text_encoders import T5XXL, build_t5_encoder, feed_forward_keeps_input_dtype

    expected, kinds, hint = MODEL_SLOTS["t5xxl"]
    file, component = _open(path, expected, kinds, hint)
    source = TensorSource.prefixed(file, component.prefix)
    for name, alias in (("shared.weight", "encoder.embed_tokens.weight"),
                        ("encoder.embed_tokens.weight", "shared.weight")):
        if name not in source.readers and alias in source.readers:  # the two names are one tied tensor
            source.readers[name], source.shapes[name] = source.readers[alias], source.shapes[alias]
    with torch.device("meta"):
        try:
            model = build_t5_encoder(source.shapes)
        except (KeyError, ValueError) as e:
            raise file.error(f"holds {component.describe()} that cannot be built: {e}") from e
    if isinstance(fp8, str) and fp8 != FP8_IF_STORED:
        raise ValueError(f"fp8 must be True, False, {FP8_IF_STORED!r} or one of {FP8_DTYPES}, not {fp8!r}")
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("encoder.block.")]
    stored = {n: file.dtype(component.prefix + n + ".weight") for n in linears}
    if fp8 == FP8_IF_STORED:
        kinds_stored = {stored[n] for n in linears} & set(FP8_DTYPES)
        weight_fp8 = kinds_stored.pop() if len(kinds_stored) == 1 else None
        fp8_layers = [n for n in linears if stored[n] == weight_fp8]
    else:
        weight_fp8 = _fp8_storage(file, fp8)
        # `wo` is never rounded to fp8 here (transformers keeps it in fp32 for fp16 models): fp8 only as stored
        fp8_layers = [n for n in linears if not n.endswith(".wo") or stored[n] in FP8_DTYPES]
    if not weight_fp8:
        fp8_layers = []
    for name in fp8_layers:
        model.get_submodule(name).__class__ = Linear  # same parameters; upcasts fp8 weights on each call
        if name.endswith(".wo"):  # transformers would cast wo's input to wo's weight dtype, here fp8
            feed_forward_keeps_input_dtype(model.get_submodule(name.removesuffix(".wo")))
    _fill(model, source, _compute_dtype(file, component.prefix, dtype), weight_fp8, fp8_layers, device)
    embedding = next((component.prefix + k for k in ("shared.weight", "encoder.embed_tokens.weight")
                      if component.prefix + k in file.header), None)
    if embedding is not None and file.dtype(embedding) in FP8_DTYPES:
        with torch.no_grad():  # e4m3fn has no infinity: values its conversion could not hold are NaN (ComfyUI too)
            model.get_submodule("shared").weight.nan_to_num_(nan=0.0)
    return T5XXL(_finish(model), tokenizer=tokenizer, max_length=max_length)


def _restore_derived_buffers(model: nn.Module, device: DeviceLike) -> None:
    """Non-persistent buffers are not in files; rebuild the ones transformers derives from the config."""
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            if not name.endswith("position_ids"):
                raise RuntimeError(f"buffer '{name}' was not loaded and cannot be derived")
            _set_tensor(model, name, torch.arange(buf.shape[-1], device=device).expand(buf.shape).contiguous())

"""fp8 base compute (trainer/fp8.py) and fp8 T5: the same function as the fp8-rounded float32 model, with one weight
upcast per block per pass, nothing upcast kept past its block, and the fp8-matmul path chosen only where it can run."""

import types
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from trainer import fp8, memory
from trainer.flow import image_ids, text_ids
from trainer.lora import LoRAConfig, LoRANetwork
from trainer.models import load_flux, load_t5xxl
from trainer.models.flux import FP8_DTYPES, Linear
from trainer.models.loading import FP8_IF_STORED, t5_fp8_option
from trainer.models.tiny import (
    TINY_FLUX,
    flux_state_dict,
    fp8_rounded,
    t5_state_dict,
    write_flux,
    write_t5xxl,
)

TOL = 1e-5
BLOCKS = TINY_FLUX.depth + TINY_FLUX.depth_single_blocks  # 4
BLOCK_LINEARS = TINY_FLUX.depth * 10 + TINY_FLUX.depth_single_blocks * 3  # 26
PROMPTS = ["a photo of a cat wearing a tiny hat", "sks dog, watercolor"]


def inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(batch, 24, 64, generator=g), img_ids=image_ids(batch, 8, 12),
                txt=torch.randn(batch, 5, TINY_FLUX.context_in_dim, generator=g), txt_ids=text_ids(batch, 5),
                timesteps=torch.rand(batch, generator=g), y=torch.randn(batch, TINY_FLUX.vec_in_dim, generator=g),
                guidance=torch.full((batch,), 3.5))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """fp8 files (e4m3fn/e5m2, plain/scaled) and, for each, the float32 file of its rounded weights."""
    folder = tmp_path_factory.mktemp("fp8")
    out = {}
    for dtype in FP8_DTYPES:
        for scaled in (False, True):
            name = f"{str(dtype).split('_')[1]}{'_scaled' if scaled else ''}"
            path = write_flux(folder / f"{name}.safetensors", fp8=dtype, scaled=scaled)
            save_file(fp8_rounded(flux_state_dict(), dtype, scaled), str(folder / f"{name}_rounded.safetensors"))
            out[dtype, scaled] = path, folder / f"{name}_rounded.safetensors"
    return out


def fp8_model(path, enable=True, **kwargs):
    model = load_flux(path, dtype=torch.float32, fp8=True, **kwargs)
    if enable:
        assert fp8.enable(model) == BLOCKS
    return model


def predict(model, x):
    with torch.no_grad():
        return model(**x)


def training_step(model, runner=None, autocast=None):
    """One LoRA step's loss and the LoRA gradients (LoRA up weights nonzero so every path carries gradient)."""
    torch.manual_seed(1)
    network = LoRANetwork.create(LoRAConfig(network_dim=4), model).attach()
    for lora in network.loras:
        torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
    memory.install(model, runner)
    model.train()
    try:
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = model(**inputs()).square().mean()
        loss.backward()
        return loss.detach().float(), {f"{lora.lora_name}.{p}": lora.get_parameter(p).grad.clone()
                                       for lora in network.loras for p in ("lora_down.weight", "lora_up.weight")}
    finally:
        network.detach()


class Fp8Casts(TorchDispatchMode):
    """Counts the kernels that read fp8 weights into a wider type."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].dtype in FP8_DTYPES:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def upcasts(monkeypatch):
    """Spies on fp8.py's two upcast helpers; keeps weak references to every tensor they make."""
    calls = {"block": 0, "one": 0, "refs": []}

    def remember(tensors):
        for t in tensors:
            calls["refs"].append(weakref.ref(t))
            if t._base is not None:
                calls["refs"].append(weakref.ref(t._base))

    def layers(*args, real=fp8.upcast_layers):
        calls["block"] += 1
        out = real(*args)
        remember(out)
        return out

    def one(*args, real=fp8.upcast_one):
        calls["one"] += 1
        out = real(*args)
        remember([out])
        return out

    monkeypatch.setattr(fp8, "upcast_layers", layers)
    monkeypatch.setattr(fp8, "upcast_one", one)
    calls["alive"] = lambda: sum(ref() is not None for ref in calls["refs"])
    return calls


# ------------------------------------------------------------------------------------------------ function

@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_fp8_base_computes_the_fp8_rounded_float32_model(files, dtype, scaled):
    path, rounded = files[dtype, scaled]
    model = fp8_model(path)
    linear1 = model.single_blocks[1].linear1
    assert linear1.weight.dtype == dtype and (linear1.weight_scale is not None) == scaled
    reference = load_flux(rounded)
    out = predict(model, inputs())
    assert (out - predict(reference, inputs())).abs().max() < TOL
    assert torch.equal(out, predict(fp8_model(path, enable=False), inputs()))  # what the per-call upcast computes


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_lora_training_step_matches_the_rounded_model(files, scaled):
    path, rounded = files[torch.float8_e4m3fn, scaled]
    loss, grads = training_step(fp8_model(path))
    ref_loss, ref_grads = training_step(load_flux(rounded))
    assert abs(loss - ref_loss) < TOL * max(1.0, ref_loss)
    assert len(grads) == 2 * BLOCK_LINEARS  # a LoRA on every block Linear
    largest = max(g.abs().max() for g in grads.values())
    assert largest > 1e-3  # the gradients compared are not all zero
    assert max((grads[k] - ref_grads[k]).abs().max() for k in grads) < TOL * largest


def test_bf16_autocast_step_is_what_the_per_call_upcast_computes(files):
    """The training loop's setting: bf16 autocast. One upcast per block gives the same bits as one per call."""
    path, _ = files[torch.float8_e4m3fn, True]
    loss, grads = training_step(fp8_model(path), autocast=torch.bfloat16)
    ref_loss, ref_grads = training_step(fp8_model(path, enable=False), autocast=torch.bfloat16)
    assert torch.equal(loss, ref_loss)
    assert all(torch.allclose(grads[k], ref_grads[k], rtol=1e-3, atol=1e-6) for k in grads)


@pytest.mark.parametrize("runner", [memory.CheckpointedRunner(), None], ids=["runner", "model-flag"])
def test_gradient_checkpointing_is_bit_equal(files, runner):
    path, _ = files[torch.float8_e4m3fn, False]
    loss, grads = training_step(fp8_model(path))
    model = fp8_model(path)
    model.gradient_checkpointing = runner is None
    ck_loss, ck_grads = training_step(model, runner)
    assert torch.equal(loss, ck_loss)
    assert all(torch.equal(grads[k], ck_grads[k]) for k in grads)


# ------------------------------------------------------------------------------------------------ casts

def test_one_upcast_per_block_per_forward(files, upcasts):
    path, _ = files[torch.float8_e4m3fn, False]
    with Fp8Casts() as baseline:
        predict(fp8_model(path, enable=False), inputs())
    assert baseline.count == BLOCK_LINEARS  # today: every Linear casts its own weight
    with Fp8Casts() as casts:
        predict(fp8_model(path), inputs())
    assert casts.count == BLOCKS and upcasts["block"] == BLOCKS and upcasts["one"] == 0


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_one_upcast_per_block_per_pass_in_training(files, upcasts, checkpointing):
    """forward, backward and (with checkpointing) the recomputation each upcast every block once."""
    model = fp8_model(files[torch.float8_e4m3fn, False][0])
    with Fp8Casts() as casts:
        training_step(model, memory.runner_for(checkpointing))
    passes = 3 if checkpointing else 2
    assert casts.count == upcasts["block"] == passes * BLOCKS and upcasts["one"] == 0


def test_upcast_weights_are_freed_after_each_block(files, upcasts):
    model = fp8_model(files[torch.float8_e4m3fn, True][0])
    alive_at_entry = []
    for block in fp8.transformer_blocks(model):
        block.register_forward_pre_hook(lambda module, args: alive_at_entry.append(upcasts["alive"]()))
    torch.manual_seed(1)
    network = LoRANetwork.create(LoRAConfig(network_dim=4), model).attach()
    loss = model.train()(**inputs()).square().mean()
    # the hooks run before fp8's own: no block's upcast weights survive into the next block, nor into backward
    assert alive_at_entry == [0] * BLOCKS and upcasts["block"] == BLOCKS and upcasts["alive"]() == 0
    loss.backward()
    assert upcasts["block"] == 2 * BLOCKS and upcasts["alive"]() == 0  # backward's upcasts freed too
    assert network.loras[0].lora_down.weight.grad is not None


def test_upcast_block_scope_shares_one_upcast_between_calls(files, upcasts):
    model = fp8_model(files[torch.float8_e4m3fn, False][0])
    block = model.single_blocks[0]
    x = torch.randn(1, 7, TINY_FLUX.hidden_size)
    vec = torch.randn(1, TINY_FLUX.hidden_size)
    pe = model.position_embedding(torch.zeros(1, 7, 3))
    with torch.no_grad(), fp8.upcast_block(block):
        a, b = block(x, vec, pe, None), block(x, vec, pe, None)
        assert upcasts["alive"]() > 0
    assert torch.equal(a, b) and upcasts["block"] == 1 and upcasts["alive"]() == 0


def test_packing_keeps_parameters_and_survives_being_undone(files, upcasts):
    path, _ = files[torch.float8_e4m3fn, False]
    model = fp8_model(path, enable=False)
    weight = model.double_blocks[0].img_attn.qkv.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp8.enable(model)
    assert model.double_blocks[0].img_attn.qkv.weight is weight  # the same Parameter, now a view of the buffer
    assert all(torch.equal(v.float(), before[k].float()) for k, v in model.state_dict().items())
    expected = predict(model, inputs())
    for layer in model.double_blocks[1].modules():  # what moving parameters one by one does to the packing
        if isinstance(layer, Linear):
            layer.weight.data = layer.weight.data.clone()
    with Fp8Casts() as casts:
        out = predict(model, inputs())
    assert torch.equal(out, expected)
    assert casts.count == BLOCKS - 1 + 10  # that block falls back to one cast per weight, once per pass
    fp8.disable(model)
    assert not any("fp8_compute" in m.__dict__ for m in model.modules())
    with Fp8Casts() as casts:
        assert torch.equal(predict(model, inputs()), expected)
    assert casts.count == BLOCK_LINEARS


# ------------------------------------------------------------------------------------------------ fp8 matmul

def fake_cuda_input(dtype=torch.bfloat16):
    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=dtype)


@pytest.mark.parametrize("capability,chosen", [((8, 6), False), ((8, 0), False), ((8, 9), True), ((9, 0), True)])
def test_fp8_matmul_is_chosen_only_on_ada_or_newer(monkeypatch, capability, chosen):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    weight = torch.zeros(32, 64, dtype=torch.float8_e4m3fn)
    assert fp8.scaled_mm_supported(fake_cuda_input(), weight) is chosen
    assert not fp8.scaled_mm_supported(torch.zeros(2, 64), weight)  # a CPU input, whatever the card
    assert not fp8.scaled_mm_supported(fake_cuda_input(), weight.to(torch.float8_e5m2))
    assert not fp8.scaled_mm_supported(fake_cuda_input(), torch.zeros(24, 64, dtype=torch.float8_e4m3fn))
    assert not fp8.scaled_mm_supported(fake_cuda_input(torch.float64), weight)


def test_fp8_matmul_is_opt_in(monkeypatch):
    monkeypatch.delenv(fp8.SCALED_MM_ENV, raising=False)
    assert not fp8.scaled_mm_wanted()  # off until measured against the upcast path on full-size FLUX
    monkeypatch.setenv(fp8.SCALED_MM_ENV, "1")
    assert fp8.scaled_mm_wanted()
    monkeypatch.setenv(fp8.SCALED_MM_ENV, "0")
    assert not fp8.scaled_mm_wanted()
    monkeypatch.delenv(fp8.SCALED_MM_ENV)
    monkeypatch.setattr(fp8, "SCALED_MM", True)
    assert fp8.scaled_mm_wanted()


def test_cpu_never_runs_an_fp8_matmul(files, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch._scaled_mm called on the CPU")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    path, rounded = files[torch.float8_e4m3fn, False]
    training_step(fp8_model(path))
    assert (predict(fp8_model(path), inputs()) - predict(load_flux(rounded), inputs())).abs().max() < TOL


def test_quantize_e4m3_uses_an_exact_power_of_two_scale():
    x = torch.randn(40, 64) * 3
    x8, scale = fp8.quantize_e4m3(x)
    assert x8.dtype == torch.float8_e4m3fn and torch.isfinite(x8.float()).all()
    assert torch.frexp(scale).mantissa == 0.5  # a power of two
    assert 224 < x8.float().abs().max() <= 448
    assert torch.allclose(x8.float() * scale, x, rtol=2**-4, atol=scale.item() * 2**-9)  # e4m3: 3 mantissa bits
    zeros, _ = fp8.quantize_e4m3(torch.zeros(16, 16))
    assert torch.equal(zeros.float(), torch.zeros(16, 16))


def _cpu_scaled_mm_or_skip():
    try:
        torch._scaled_mm(torch.zeros(16, 16, dtype=torch.float8_e4m3fn),
                         torch.zeros(16, 16, dtype=torch.float8_e4m3fn).t(), scale_a=torch.tensor(1.0),
                         scale_b=torch.tensor(1.0), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch build has no CPU fp8 matmul to exercise the path with: {e}")


def test_fp8_matmul_path_computes_the_quantised_product():
    """Checked on the CPU where torch has an fp8 matmul; on CUDA the same function runs only where chosen."""
    _cpu_scaled_mm_or_skip()
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 64, generator=g), torch.randn(32, 64, generator=g) / 8
    w8, w_scale = (w / 0.01).to(torch.float8_e4m3fn), torch.tensor(0.01)
    bias = torch.randn(32, generator=g)
    out = fp8.scaled_mm_linear(x, w8, w_scale, bias, torch.float32)
    x8, x_scale = fp8.quantize_e4m3(x.reshape(-1, 64))
    expected = torch.nn.functional.linear(x8.float() * x_scale, w8.float() * w_scale, bias).reshape(3, 5, 32)
    assert out.shape == (3, 5, 32) and torch.allclose(out, expected, atol=1e-5)


def test_fp8_matmul_makes_its_constant_once_per_device(monkeypatch):
    """Every Linear call of the fp8 matmul path needs a float32 1 (the power-of-two scale, the weight scale of an
    unscaled weight): made once per device, not per call."""
    made = []
    real_ones = torch.ones

    def counting_ones(*args, **kwargs):
        made.append(args)
        return real_ones(*args, **kwargs)

    def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype):
        return (a.float() @ b.float() * scale_a * scale_b).to(out_dtype)

    monkeypatch.setattr(fp8, "_ONES", {})
    monkeypatch.setattr(torch, "ones", counting_ones)
    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    g = torch.Generator().manual_seed(0)
    x, w8 = torch.randn(4, 32, generator=g), (torch.randn(16, 32, generator=g) / 8).to(torch.float8_e4m3fn)
    outs = [fp8.scaled_mm_linear(x, w8, None, None, torch.float32) for _ in range(3)]
    assert len(made) == 1 and all(torch.equal(o, outs[0]) for o in outs)
    x8, scale = fp8.quantize_e4m3(x)
    assert len(made) == 1 and torch.equal(scale, fp8.quantize_e4m3(x)[1])
    assert torch.allclose(outs[0], x8.float() @ w8.float().t() * scale)


def test_forced_fp8_matmul_model_step(files, monkeypatch, upcasts):
    """With the fp8 matmul forced on (the CPU stands in for an Ada/Hopper card): no weight upcast in forward, one per
    block in backward; the output is the rounded model's within the error of quantising activations to e4m3."""
    monkeypatch.setattr(fp8, "SCALED_MM", True)  # opt-in path
    _cpu_scaled_mm_or_skip()
    monkeypatch.setattr(fp8, "scaled_mm_supported", lambda x, weight: weight.dtype == torch.float8_e4m3fn)
    path, rounded = files[torch.float8_e4m3fn, True]
    out, expected = predict(fp8_model(path), inputs()), predict(load_flux(rounded), inputs())
    assert upcasts["block"] == upcasts["one"] == 0
    assert 0 < (out - expected).abs().max() < 0.1 * expected.abs().max()
    loss, grads = training_step(fp8_model(path))
    ref_loss, ref_grads = training_step(load_flux(rounded))
    assert upcasts["block"] == BLOCKS and upcasts["one"] == 0 and upcasts["alive"]() == 0
    assert abs(loss - ref_loss) < 0.05 * ref_loss
    worst = max((grads[k] - ref_grads[k]).norm() / ref_grads[k].norm() for k in grads if ref_grads[k].norm() > 0)
    assert worst < 0.2


def test_an_fp8_matmul_that_fails_falls_back_to_the_upcast(files, monkeypatch):
    monkeypatch.setattr(fp8, "SCALED_MM", True)  # opt-in path
    def unsupported(*args, **kwargs):
        raise RuntimeError("no fp8 matmul for these shapes")

    monkeypatch.setattr(torch, "_scaled_mm", unsupported)
    monkeypatch.setattr(fp8, "scaled_mm_supported", lambda x, weight: True)
    path, rounded = files[torch.float8_e4m3fn, False]
    with pytest.warns(UserWarning, match="fp8 matmul failed"):
        out = predict(fp8_model(path), inputs())
    assert (out - predict(load_flux(rounded), inputs())).abs().max() < TOL


# ------------------------------------------------------------------------------------------------ T5

def test_t5_fp8_option_follows_sd_scripts():
    assert t5_fp8_option(t5xxl_fp8=True, fp8_base=False) is True
    assert t5_fp8_option(t5xxl_fp8=False, fp8_base=True) == FP8_IF_STORED
    assert t5_fp8_option(t5xxl_fp8=False, fp8_base=True, fp8_base_unet=True) is False  # text encoders not fp8
    assert t5_fp8_option(t5xxl_fp8=False, fp8_base=False) is False


def t5_reference(state):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=32128, d_model=32, d_kv=16, num_heads=2, d_ff=64, num_layers=2,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    model = T5EncoderModel(cfg).eval()
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model


def test_fp8_t5_file_stays_fp8_under_fp8_base(tmp_path, tokenizer_dirs):
    path = write_t5xxl(tmp_path / "t5xxl_fp8_e4m3fn.safetensors", dtype=torch.float8_e4m3fn)
    t5 = load_t5xxl(path, dtype=torch.float32, tokenizer=tokenizer_dirs["t5xxl"], max_length=16,
                    fp8=t5_fp8_option(t5xxl_fp8=False, fp8_base=True))
    block = t5.model.encoder.block[0]
    linears = [m for n, m in t5.model.named_modules() if isinstance(m, torch.nn.Linear) and "block" in n]
    assert len(linears) == 2 * 7 and {m.weight.dtype for m in linears} == {torch.float8_e4m3fn}  # wo included
    assert block.layer[0].layer_norm.weight.dtype == torch.float32  # the sensitive parts stay in the compute dtype
    assert block.layer[0].SelfAttention.relative_attention_bias.weight.dtype == torch.float32
    assert t5.model.shared.weight.dtype == t5.model.encoder.final_layer_norm.weight.dtype == torch.float32
    ids, mask = t5.tokenize(PROMPTS)
    reference = t5_reference(load_file(path))  # transformers' T5 on the file's values in float32
    with torch.no_grad():
        for m in (None, mask):
            # same weights, same float32 arithmetic: only summation order may differ (|h| ~ 1, 2 layers)
            assert torch.allclose(t5(ids, m), reference(input_ids=ids, attention_mask=m).last_hidden_state, atol=1e-5)


def test_fp8_t5_in_bf16_stays_close(tmp_path, tokenizer_dirs):
    path = write_t5xxl(tmp_path / "t5xxl_fp8_e4m3fn.safetensors", dtype=torch.float8_e4m3fn)
    t5 = load_t5xxl(path, dtype=torch.bfloat16, tokenizer=tokenizer_dirs["t5xxl"], max_length=16, fp8=FP8_IF_STORED)
    ids, _ = t5.tokenize(PROMPTS)
    with torch.no_grad():
        out, expected = t5(ids).float(), t5_reference(load_file(path))(input_ids=ids).last_hidden_state
    # bf16 keeps 8 significant bits (relative 2**-8 per rounding); a few dozen roundings along two layers stay
    # within a few percent of the output's scale
    assert (out - expected).abs().max() < 0.03 * expected.abs().max()


def test_16_bit_t5_file_is_not_converted_under_fp8_base(tiny_files, tokenizer_dirs):
    t5 = load_t5xxl(tiny_files["t5xxl"], dtype=torch.float32, tokenizer=tokenizer_dirs["t5xxl"], fp8=FP8_IF_STORED)
    assert {p.dtype for p in t5.parameters()} == {torch.float32}
    converted = load_t5xxl(tiny_files["t5xxl"], dtype=torch.float32, tokenizer=tokenizer_dirs["t5xxl"], fp8=True)
    ff = converted.model.encoder.block[1].layer[1].DenseReluDense
    assert ff.wi_0.weight.dtype == torch.float8_e4m3fn and ff.wo.weight.dtype == torch.float32  # wo never rounded


def test_nan_in_an_fp8_t5_embedding_is_zeroed(tmp_path, tokenizer_dirs):
    state = {k: v.to(torch.float8_e4m3fn) for k, v in t5_state_dict().items()}
    state["shared.weight"][5, :3] = float("nan")
    save_file(state, str(tmp_path / "t5.safetensors"))
    t5 = load_t5xxl(tmp_path / "t5.safetensors", dtype=torch.float32, tokenizer=tokenizer_dirs["t5xxl"],
                    max_length=16, fp8=FP8_IF_STORED)
    assert torch.isfinite(t5.model.shared.weight).all() and (t5.model.shared.weight[5, :3] == 0).all()
    with torch.no_grad():
        assert torch.isfinite(t5(torch.tensor([[5, 6, 1]]))).all()


def test_the_counts_above_are_the_tiny_models():
    from trainer.models.flux import Flux

    with torch.device("meta"):
        model = Flux(TINY_FLUX)
    blocks = fp8.transformer_blocks(model)
    assert len(blocks) == BLOCKS
    assert sum(isinstance(m, Linear) for block in blocks for m in block.modules()) == BLOCK_LINEARS


# ------------------------------------------------------------------------------------------------ with the runners

def test_composes_with_block_swap(files, upcasts):
    """Swapped blocks run as recomputations from their slots (where the weights lie back to back, so they upcast in
    one cast too): the same step, and still nothing upcast outlives its block."""
    path, _ = files[torch.float8_e4m3fn, False]
    loss, grads = training_step(fp8_model(path))
    upcasts["refs"].clear()
    swap_loss, swap_grads = training_step(fp8_model(path), memory.runner_for(False, blocks_to_swap=2))
    assert torch.equal(loss, swap_loss) and all(torch.equal(grads[k], swap_grads[k]) for k in grads)
    assert upcasts["alive"]() == 0 and upcasts["one"] == 0


def test_compiled_blocks_trace_without_graph_breaks(files):
    """Inside torch.compile the layers take the plain upcast (the compiler schedules the casts), with no graph
    break at each Linear."""
    from torch._dynamo.utils import counters

    path, _ = files[torch.float8_e4m3fn, False]
    loss, grads = training_step(fp8_model(path))
    torch._dynamo.reset()
    counters.clear()
    compiled_loss, compiled_grads = training_step(fp8_model(path), memory.CompiledRunner(memory.PlainRunner(),
                                                                                          "aot_eager"))
    assert not counters["graph_break"]
    assert abs(loss - compiled_loss) < TOL and all(torch.allclose(grads[k], compiled_grads[k], atol=TOL)
                                                   for k in grads)


# ------------------------------------------------------------------------------------------------ loading

def test_fp8_conversion_runs_on_the_device_asked_for():
    """With block swap the transformer is read into host memory: its bf16 -> fp8 narrowing is computed on the compute
    device given ('meta' stands in for the GPU here), the rest cast as before."""
    from torch.overrides import TorchFunctionMode

    from trainer.device_cast import cast_on

    class Casts(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.Tensor.to:
                self.seen.append((args[0].device.type, args[0].dtype, out.device.type, out.dtype))
            return out

    value = torch.randn(4, 4, dtype=torch.bfloat16)
    with Casts() as casts:
        out = cast_on(value, torch.float8_e4m3fn, "meta", convert_device="meta")
    assert out.device.type == "meta" and out.dtype == torch.float8_e4m3fn
    narrowing = [c for c in casts.seen if c[3] == torch.float8_e4m3fn and c[1] != torch.float8_e4m3fn]
    assert narrowing == [("meta", torch.bfloat16, "meta", torch.float8_e4m3fn)]
    with Casts() as casts:
        kept = cast_on(value, torch.float32, "cpu", convert_device="meta")  # not a narrowing to fp8: where it is
    assert kept.device.type == "cpu" and casts.seen == [("cpu", torch.bfloat16, "cpu", torch.float32)]
    assert torch.equal(cast_on(value, torch.float8_e4m3fn, "cpu"), value.to(torch.float8_e4m3fn))


def test_load_flux_narrows_to_fp8_on_the_convert_device(tmp_path, monkeypatch):
    """With block swap the transformer is read into host memory; its bf16 -> fp8 narrowing is asked of the compute
    device (convert_device) instead of the CPU, and gives the same bytes."""
    from trainer.models import loading

    path = write_flux(tmp_path / "flux.safetensors", dtype=torch.bfloat16)
    asked = []
    real = loading.cast_on

    def recording(value, dtype, device, convert_device=None):
        if dtype in FP8_DTYPES:
            asked.append(convert_device)
        return real(value, dtype, device, convert_device)

    plain = load_flux(path, fp8=True)
    monkeypatch.setattr(loading, "cast_on", recording)
    converted = load_flux(path, fp8=True, convert_device="cpu")
    assert asked and set(asked) == {"cpu"}
    for (name, a), b in zip(plain.state_dict().items(), converted.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype in FP8_DTYPES else a,
                                                  b.view(torch.uint8) if b.dtype in FP8_DTYPES else b), name

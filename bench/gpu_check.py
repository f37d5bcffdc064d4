"""One command for the card: every CUDA path of the memory work, checked against the plain path, then the memory
benchmark's targets, then (with --sd-scripts) sd-scripts' own step beside ours. One JSON and one table: PASS / FAIL
per path and per target. The first thing to run the day a session is lent a GPU.

    python bench/gpu_check.py --json gpu_check.json                         # about 7 minutes on an H100
    python bench/gpu_check.py --sd-scripts ~/sd-scripts --json gpu_check.json --budget 470
    python bench/gpu_check.py --dry-run                                     # CPU, seconds: what the tests run

Parts, each announced with its estimated time; a part or benchmark configuration that would not fit what is left of
--budget (seconds, default 450) is skipped and reported "not run":

(a) smoke: a FLUX-shaped model (FLUX.1's 19 double + 38 single blocks, so --blocks_to_swap 1 / 18 / 35 map as on FLUX.1;
    hidden size 128) with a LoRA whose dropouts draw random numbers, trained in lockstep with the same model on the
    plain path, in float32 with deterministic kernels: losses, LoRA gradients and the trained LoRA must agree. Block
    swap 1 / 18 / 35 with and without checkpointing (forward, recomputation and backward all run through the slots);
    CPU-offloaded checkpointing; the fp8 base's block upcast (plain, scaled, with swap 18); the fp8 matmul against the
    upcast matmul; bf16 -> fp8 narrowing on the card against the CPU's, byte for byte; pinned registration (one
    page-aligned buffer per block, a full-size FLUX.1 block, and a refused registration whose error must not reach the
    next kernel); teardown leaving one device. Races are provoked, not hoped for: the side stream sleeps before every
    copy into a slot or to the host, and the compute stream at the start of every swapped block. Negative controls run
    the same harness with one wait removed (`_wait_for_copy`, `_copy_after_compute`, a raw failed registration) and must
    see the difference; when one does not, the race checks are INCONCLUSIVE rather than passed.
(b) bench: bench/memory.py's configurations on full-size FLUX.1-dev with random weights (each run in its own
    process), judged against the issue's targets.
(c) with --sd-scripts PATH: bench/memory.py runs sd-scripts' step for the same configurations (its columns).

--dry-run runs everything that can run on the CPU with a tiny model (CUDA-only paths are SKIP) and bench/memory.py in
its tiny mode: what tests/test_gpu_check.py checks. Exit status 1 when anything FAILs.
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the float32 comparisons

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer import block_swap, fp8, memory  # noqa: E402
from trainer.block_swap import BlockSwapRunner  # noqa: E402
from trainer.lora import LoRAConfig, LoRANetwork  # noqa: E402
from trainer.models.flux import FP8_DTYPES, Flux, FluxParams  # noqa: E402
from trainer.models.tiny import TINY_FLUX, flux_state_dict  # noqa: E402

SMOKE_PARAMS = FluxParams(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=64, hidden_size=128,
                          mlp_hidden_dim=512, num_heads=2, depth=19, depth_single_blocks=38, axes_dim=(8, 28, 28))
DRY_PARAMS = TINY_FLUX  # 2 double + 2 single blocks: one of each swaps
# the dry run's share of the paths (seconds on a busy CPU): one swap with and one without checkpointing, one each of
# the others; the CUDA-only ones report SKIP at no cost
DRY_PATHS = ("swap35_ckpt", "swap1_nockpt", "control_no_event_wait", "control_no_wait_stream", "offload",
             "fp8_upcast_swap", "fp8_matmul", "fp8_convert_on_device", "pinned_registration", "control_pinned_error",
             "teardown_one_device")
LORA = LoRAConfig(network_dim=4, network_alpha=4, network_dropout=0.1, rank_dropout=0.1)
E4M3 = torch.float8_e4m3fn
TOL_EXACT = 1e-5  # float32, deterministic kernels: the other path computes what the plain path computes
TOL_FP8_MATMUL = 0.08  # activations quantised to e4m3: a few percent on outputs (trainer/fp8.py)
DELAY_CYCLES = 2_000_000  # about 1 ms per delay on a 2 GHz GPU clock
# FLUX.1-dev's double block Linear shapes ([out, in]), for the full-size registration
FLUX_DOUBLE_WEIGHTS = [(9216, 3072), (3072, 3072), (12288, 3072), (3072, 12288), (18432, 3072)] * 2
# seconds on an H100 (measured or, until a card runs this, guessed from DESIGN.md's H200 figures); the plan uses them
SMOKE_ESTIMATE_S = 75.0
BENCH_ESTIMATE_S = {"ckpt_1024": 30, "ckpt_512": 22, "swap18_1024": 45, "offload_1024": 55, "fp8_1024": 30,
                    "fp8_512": 24, "fp8_swap18_1024": 45, "row8gb_1024": 55, "nockpt_1024": 30}
TINY_ESTIMATE_S = 3.0  # a configuration of the tiny model on the CPU (--dry-run)
DRY_SMOKE_ESTIMATE_S = 15.0
SD_SCRIPTS_FACTOR = 1.6  # their runs take longer (sd-scripts' swap and offload are slower)
# the configurations in the order they are worth running: the ones with targets first
BENCH_ORDER = ("ckpt_1024", "swap18_1024", "fp8_1024", "fp8_swap18_1024", "offload_1024", "row8gb_1024", "ckpt_512",
               "fp8_512", "nockpt_1024")


@dataclasses.dataclass
class Outcome:
    name: str
    part: str
    verdict: str  # PASS, FAIL, SKIP, INCONCLUSIVE, not run
    detail: str = ""
    seconds: float = 0.0


class Env:
    def __init__(self, device: torch.device, dry_run: bool):
        self.device, self.dry_run = device, dry_run
        self.cuda = device.type == "cuda"
        self.params = DRY_PARAMS if dry_run else SMOKE_PARAMS
        self.state = flux_state_dict(self.params, seed=5)
        self.swaps = (1, 35) if dry_run else (1, 18, 35)
        self.steps = 1 if dry_run else 2
        self.delay = DELAY_CYCLES if self.cuda else 0


# ------------------------------------------------------------------------------------------------ lockstep

def deterministic() -> None:
    if not torch.cuda.is_available():
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_math_sdp(True)
    torch.use_deterministic_algorithms(True, warn_only=True)  # no atomics in the float32 backward where avoidable


def to_fp8(flux: Flux, scaled: bool) -> None:
    """The block Linears in float8_e4m3fn as load_flux(fp8=True) keeps them (with a weight_scale when scaled)."""
    for block in [*flux.double_blocks, *flux.single_blocks]:
        for m in block.modules():
            if isinstance(m, nn.Linear):
                w = m.weight.detach().float()
                scale = (w.abs().max() / torch.finfo(E4M3).max).reshape(()) if scaled else None
                m.weight = nn.Parameter((w / scale if scaled else w).to(E4M3), requires_grad=False)
                if scaled:
                    m.weight_scale = scale


def make_inputs(env: Env, step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    p, batch, n_img, n_txt = env.params, 2, 16, 8
    out = dict(img=torch.randn(batch, n_img, p.in_channels, generator=g),
               img_ids=torch.randint(0, 4, (batch, n_img, 3), generator=g).float(),
               txt=torch.randn(batch, n_txt, p.context_in_dim, generator=g), txt_ids=torch.zeros(batch, n_txt, 3),
               timesteps=torch.rand(batch, generator=g), y=torch.randn(batch, p.vec_in_dim, generator=g),
               guidance=torch.full((batch,), 3.5))
    return {k: v.to(env.device) for k, v in out.items()}


class Trainee:
    """The smoke model with a LoRA and AdamW; `runner` built on the host (as a session loads with block swap) and
    installed before the model moves, `fp8` the base's storage, `enable_fp8` the block upcast of trainer/fp8.py."""

    def __init__(self, env: Env, runner=None, fp8_kind: str | None = None, enable_fp8: bool = False):
        self.env = env
        self.flux = Flux(env.params)
        self.flux.load_state_dict(env.state)
        self.flux.requires_grad_(False)
        if fp8_kind:
            to_fp8(self.flux, scaled=fp8_kind == "scaled")
        if isinstance(runner, BlockSwapRunner):
            memory.install(self.flux, runner)  # moves what stays resident to the compute device
        else:
            self.flux.to(env.device)
            if runner is not None:
                memory.install(self.flux, runner)
        if enable_fp8:
            fp8.enable(self.flux)
        torch.manual_seed(7)
        self.network = LoRANetwork.create(LORA, self.flux).to(env.device).attach()
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=1e-2)
        self.flux.train()
        self.network.train()

    def step(self, step: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(step)
        if self.env.cuda:
            torch.cuda.manual_seed(step)
        loss = self.flux(**make_inputs(self.env, step)).float().square().mean()
        loss.backward()
        grads = [p.grad.detach().clone() for p in self.network.parameters()]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grads

    def close(self) -> None:
        self.network.detach()
        memory.teardown(self.flux)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def lockstep(env: Env, reference: Trainee, other: Trainee) -> float:
    """The worst relative difference of losses, LoRA gradients and trained LoRA weights over env.steps steps."""
    worst = 0.0
    for step in range(env.steps):
        loss, grads = reference.step(step)
        other_loss, other_grads = other.step(step)
        worst = max(worst, rel_diff(other_loss, loss), *(rel_diff(g, h) for h, g in zip(grads, other_grads)))
    params = zip(reference.network.parameters(), other.network.parameters())
    return max(worst, *(rel_diff(q, p) for p, q in params))


def compare(env: Env, make_other: Callable[[], Trainee], tol: float = TOL_EXACT,
            make_reference: Callable[[], Trainee] | None = None) -> tuple[str, str]:
    reference = make_reference() if make_reference else Trainee(env, memory.runner_for(True))
    other = make_other()
    try:
        worst = lockstep(env, reference, other)
    finally:
        reference.close()
        other.close()
    verdict = "PASS" if worst <= tol else "FAIL"
    return verdict, f"worst relative difference {worst:.2e} (tolerance {tol:g})"


# ------------------------------------------------------------------------------------------------ race provocation

def sleep_on(stream, cycles: int) -> None:
    if cycles and stream is not None:
        with torch.cuda.stream(stream):
            torch.cuda._sleep(cycles)


class DelayedSwapRunner(BlockSwapRunner):
    """The side stream sleeps before each copy into a slot, the compute stream at the start of each swapped block."""

    delay = 0

    def _copy_after_compute(self) -> None:
        super()._copy_after_compute()
        sleep_on(self._side, self.delay)

    def __call__(self, kind, index, block, *args):
        if (kind, index) in self._linears and self._side is not None:
            sleep_on(torch.cuda.current_stream(self.compute_device), self.delay)
        return super().__call__(kind, index, block, *args)


class NoEventWaitRunner(DelayedSwapRunner):
    """Negative control: the compute stream does not wait for a slot's copy."""

    def _wait_for_copy(self, ready) -> None:
        pass


class NoWaitStreamRunner(DelayedSwapRunner):
    """Negative control: a slot is overwritten without waiting for the kernels still reading it."""

    def _copy_after_compute(self) -> None:
        sleep_on(self._side, self.delay)


class DelayedOffloadRunner(memory.OffloadedCheckpointRunner):
    delay = 0

    def _copy(self, t):
        if t.is_cuda and self.delay:
            sleep_on(self._sides.get(t.device) or self._sides.setdefault(t.device, torch.cuda.Stream(t.device)),
                     self.delay)
        return super()._copy(t)


def swap_runner(env: Env, blocks: int, checkpointing: bool, cls=DelayedSwapRunner) -> BlockSwapRunner:
    runner = cls(blocks, checkpointing, compute_device=env.device, host_device="cpu")
    runner.delay = env.delay
    return runner


# ------------------------------------------------------------------------------------------------ paths

def path_swap(env: Env, blocks: int, checkpointing: bool) -> tuple[str, str]:
    holder = {}

    def make():
        holder["runner"] = swap_runner(env, blocks, checkpointing)
        return Trainee(env, holder["runner"])

    verdict, detail = compare(env, make)
    plan = holder["runner"].plan
    return verdict, f"{plan.double} double + {plan.single} single swapped; {detail}"


def path_control(env: Env, cls) -> tuple[str, str]:
    """A runner with one wait removed must differ from the plain path, or the race checks prove nothing."""
    if not env.cuda:
        return "SKIP", "needs CUDA (no second stream on the CPU)"
    verdict, detail = compare(env, lambda: Trainee(env, swap_runner(env, 35, True, cls)))
    if verdict == "FAIL":
        return "PASS", "the harness saw the race: " + detail
    return "INCONCLUSIVE", "no difference with the wait removed, so the race checks above prove little: " + detail


def path_offload(env: Env) -> tuple[str, str]:
    def make():
        runner = DelayedOffloadRunner("cpu")
        runner.delay = env.delay
        return Trainee(env, runner)

    return compare(env, make)


def path_fp8_upcast(env: Env, kind: str, swap: int = 0) -> tuple[str, str]:
    """trainer/fp8.py's block upcast (with block swap: the slot's one cast) against the per-call upcast."""
    def reference():
        return Trainee(env, memory.runner_for(True), fp8_kind=kind)

    def other():
        runner = swap_runner(env, swap, True) if swap else memory.runner_for(True)
        return Trainee(env, runner, fp8_kind=kind, enable_fp8=True)

    return compare(env, other, make_reference=reference)


def path_fp8_matmul(env: Env) -> tuple[str, str]:
    probe = torch.empty(1, 16, dtype=torch.bfloat16, device=env.device)
    if not fp8.scaled_mm_supported(probe, torch.empty(16, 16, dtype=E4M3, device=env.device)):
        return "SKIP", "needs a CUDA card of compute capability 8.9 or newer"
    g = torch.Generator(device="cpu").manual_seed(3)
    x = torch.randn(64, 256, generator=g).to(env.device, torch.bfloat16)
    w = (torch.randn(128, 256, generator=g) * 0.05).to(env.device).to(E4M3)
    bias = torch.randn(128, generator=g).to(env.device, torch.bfloat16)
    worst = 0.0
    for scale in (None, torch.tensor(0.5, device=env.device)):
        got = fp8.scaled_mm_linear(x, w, scale, bias, torch.bfloat16)
        wide = w.to(torch.bfloat16) * (scale.to(torch.bfloat16) if scale is not None else 1)
        worst = max(worst, rel_diff(got, F.linear(x, wide, bias)))
    verdict = "PASS" if worst <= TOL_FP8_MATMUL else "FAIL"
    return verdict, f"relative difference to the upcast matmul {worst:.3f} (tolerance {TOL_FP8_MATMUL})"


def path_fp8_convert(env: Env) -> tuple[str, str]:
    """bf16 -> fp8 narrowing on the card (trainer/device_cast.py, what loading with block swap does) gives the very
    bytes the CPU gives, overflow and subnormals included."""
    if not env.cuda:
        return "SKIP", "needs CUDA"
    from trainer.device_cast import cast_on

    g = torch.Generator().manual_seed(4)
    value = torch.cat([torch.randn(3072 * 1024, generator=g) * scale for scale in (1e-4, 0.05, 3.0, 900.0)])
    value = value.to(torch.bfloat16).reshape(-1, 3072)
    worst = 0
    for dtype in FP8_DTYPES:
        on_cpu = value.to(dtype)
        on_card = cast_on(value, dtype, "cpu", convert_device=env.device)
        worst += int((on_cpu.view(torch.uint8) != on_card.view(torch.uint8)).sum())
    return ("PASS" if worst == 0 else "FAIL"), f"{worst} of {2 * value.numel()} bytes differ from the CPU's"


def kernel_error(device: torch.device) -> str | None:
    """Launch a kernel and wait: an error a failed runtime call left set is raised (and cleared) here."""
    try:
        torch.ones(16, device=device).mul_(2)
        torch.cuda.synchronize(device)
        return None
    except RuntimeError as e:
        return str(e).splitlines()[0]


def path_pinned(env: Env) -> tuple[str, str]:
    """One page-aligned buffer registered per block, usable for asynchronous copies; a refused registration (the same
    pages registered twice) falls back without leaving CUDA's error for the next kernel."""
    if not env.cuda:
        return "SKIP", "needs CUDA"
    nbytes = sum(o * i for o, i in FLUX_DOUBLE_WEIGHTS) * 2  # one FLUX.1 double block in bf16: 648 MiB
    started = time.perf_counter()
    buffer = block_swap._HostBuffer(nbytes, pin=True)
    seconds = time.perf_counter() - started
    if not buffer.registered or buffer.bytes.data_ptr() % block_swap.PAGE:
        return "FAIL", f"a {nbytes / 2**20:.0f} MiB block buffer was not registered page-aligned"
    buffer.bytes[:: 2**20].fill_(7)
    back = buffer.bytes.to(env.device, non_blocking=True).cpu()
    if not torch.equal(back, buffer.bytes):
        return "FAIL", "an asynchronous copy from the registered buffer differs"
    refused = block_swap._register_host(buffer.bytes.data_ptr(), block_swap.PAGE)
    left = kernel_error(env.device)
    detail = f"{nbytes / 2**20:.0f} MiB registered in {seconds:.2f} s; second registration refused: {not refused}"
    buffer.unregister()
    if refused or left:
        return "FAIL", detail + (f"; the next kernel failed: {left}" if left else "")
    return "PASS", detail


def path_pinned_control(env: Env) -> tuple[str, str]:
    """Negative control: the same refusal through the raw binding, error not cleared, must reach the next kernel."""
    if not env.cuda:
        return "SKIP", "needs CUDA"
    buffer = block_swap._HostBuffer(4 * block_swap.PAGE, pin=True)
    code = int(torch.cuda.cudart().cudaHostRegister(buffer.bytes.data_ptr(), block_swap.PAGE, 1))
    left = kernel_error(env.device)
    buffer.unregister()
    if code == 0:
        return "INCONCLUSIVE", "the runtime accepted a second registration of the same pages"
    if left:
        return "PASS", f"the stale error (code {code}) reached the next kernel: {left}"
    return "INCONCLUSIVE", f"the runtime refused (code {code}) but left no error for the next kernel"


def path_teardown(env: Env) -> tuple[str, str]:
    """After training with swap 18, teardown leaves every parameter and buffer on the compute device; teardown to the
    CPU (what a run ending in out-of-memory asks for) leaves them all there."""
    devices = {}
    for target in (None, "cpu"):
        trainee = Trainee(env, swap_runner(env, 18, True))
        trainee.step(0)
        trainee.network.detach()
        memory.teardown(trainee.flux, device=target)
        devices[target or "compute"] = {str(t.device) for t in [*trainee.flux.parameters(), *trainee.flux.buffers()]}
    ok = devices["compute"] == {str(torch.device(env.device))} and devices["cpu"] == {"cpu"}
    return ("PASS" if ok else "FAIL"), f"devices after teardown: {devices}"


def smoke_paths(env: Env) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
    paths = []
    for blocks in env.swaps:
        for checkpointing in (True, False):
            name = f"swap{blocks}_{'ckpt' if checkpointing else 'nockpt'}"
            paths.append((name, lambda b=blocks, c=checkpointing: path_swap(env, b, c)))
    paths += [("control_no_event_wait", lambda: path_control(env, NoEventWaitRunner)),
              ("control_no_wait_stream", lambda: path_control(env, NoWaitStreamRunner)),
              ("offload", lambda: path_offload(env)),
              ("fp8_upcast_plain", lambda: path_fp8_upcast(env, "plain")),
              ("fp8_upcast_scaled", lambda: path_fp8_upcast(env, "scaled")),
              ("fp8_upcast_swap", lambda: path_fp8_upcast(env, "scaled", swap=env.swaps[-1] if env.dry_run else 18)),
              ("fp8_matmul", lambda: path_fp8_matmul(env)),
              ("fp8_convert_on_device", lambda: path_fp8_convert(env)),
              ("pinned_registration", lambda: path_pinned(env)),
              ("control_pinned_error", lambda: path_pinned_control(env)),
              ("teardown_one_device", lambda: path_teardown(env))]
    return [(n, run) for n, run in paths if n in DRY_PATHS] if env.dry_run else paths


def run_smoke(env: Env) -> list[Outcome]:
    deterministic()
    threads = torch.get_num_threads()
    if env.dry_run:
        torch.set_num_threads(1)  # tiny tensors: threads only contend with whatever else the machine runs
    try:
        return [run_path(env, name, run) for name, run in smoke_paths(env)]
    finally:
        torch.set_num_threads(threads)


def run_path(env: Env, name: str, run: Callable[[], tuple[str, str]]) -> Outcome:
    """One smoke path, its verdict and detail; any exception, or a CUDA error it leaves behind, is a FAIL."""
    started = time.perf_counter()
    try:
        verdict, detail = run()
    except Exception as e:  # one broken path must not hide the others
        traceback.print_exc()
        verdict, detail = "FAIL", f"{type(e).__name__}: {e}"
    if env.cuda and (error := kernel_error(env.device)):
        verdict, detail = "FAIL", f"{detail}; CUDA error left after the path: {error}"
    outcome = Outcome(name, "smoke", verdict, detail, time.perf_counter() - started)
    say(f"  {name:<24} {verdict:<12} {detail} ({outcome.seconds:.1f} s)")
    if env.cuda:
        torch.cuda.empty_cache()
    return outcome


# ------------------------------------------------------------------------------------------------ benchmark

def load_bench_memory():
    spec = importlib.util.spec_from_file_location("bench_memory", REPO / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def bench_plan(names: list[str], budget: float, sd_scripts: bool,
               tiny: bool = False) -> tuple[list[str], list[str], float]:
    """The configurations that fit `budget` seconds (in BENCH_ORDER), those that do not, and the estimate."""
    chosen, left, total = [], [], 0.0
    for name in names:
        cost = (TINY_ESTIMATE_S if tiny else BENCH_ESTIMATE_S.get(name, 45)) * (
            1 + (SD_SCRIPTS_FACTOR if sd_scripts else 0))
        if total + cost <= budget:
            chosen.append(name)
            total += cost
        else:
            left.append(name)
    return chosen, left, total


def run_bench(args, budget: float) -> tuple[list[Outcome], dict | None]:
    sd_unusable = None
    if args.sd_scripts and not (Path(args.sd_scripts).expanduser() / "library" / "flux_models.py").is_file():
        sd_unusable = f"{args.sd_scripts} is not an sd-scripts checkout (no library/flux_models.py)"
        args = argparse.Namespace(**{**vars(args), "sd_scripts": None})
    bench = load_bench_memory()
    names = [n for n in BENCH_ORDER if n in bench.CONFIGS] if not args.dry_run else ["fp8_swap18_1024"]
    sd = bool(args.sd_scripts)
    chosen, left, estimate = bench_plan(names, budget, sd, tiny=args.dry_run)
    say(f"(b) bench{' + (c) sd-scripts' if sd else ''}: {len(chosen)} configurations, about {estimate:.0f} s "
        f"estimated" + (f"; not run (past --budget): {', '.join(left)}" if left else ""))
    outcomes = [Outcome(f"bench:{n}", "bench", "not run", "past --budget") for n in left]
    if sd_unusable:
        outcomes.append(Outcome("sd-scripts", "sd-scripts", "SKIP", sd_unusable))
    if not chosen:
        return outcomes, None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        argv = ["--configs", ",".join(chosen), "--json", str(out)]
        if args.dry_run:
            argv += ["--tiny", "--no-subprocess", "--steps", "1", "--warmup", "0", "--device", "cpu"]
        else:
            argv += ["--steps", "4", "--warmup", "1", "--device", str(args.device), "--budget", f"{budget:.0f}"]
        if sd:
            argv += ["--sd-scripts", args.sd_scripts]
        bench.main(argv)
        data = json.loads(out.read_text()) if out.is_file() else {"results": [], "targets": {}}
    sys.modules.pop("bench_memory", None)
    by_run = {(r["config"], r["impl"]): r for r in data["results"]}
    for name in chosen:
        for impl in ("ours", "sd-scripts") if sd else ("ours",):
            result = by_run.get((name, impl))
            part = "bench" if impl == "ours" else "sd-scripts"
            outcomes.append(run_outcome(name, impl, part, result, data["targets"].get(name), args.dry_run))
    return outcomes, data


def run_outcome(name: str, impl: str, part: str, result: dict | None, target: dict | None,
                dry_run: bool) -> Outcome:
    """A benchmark run as a row: its target's verdict for ours (PASS/FAIL), else whether it ran."""
    label = f"{part}:{name}"
    if result is None:
        return Outcome(label, part, "not run", "no result")
    status = result["status"]
    figures = (f"{result['s_per_step']:.3f} s/step" if result.get("s_per_step") is not None else status) + (
        f", peak {result['peak_gib']:.2f} GiB" if result.get("peak_gib") is not None else "")
    seconds = sum(result.get("times") or [])
    if impl != "ours":
        return Outcome(label, part, {"ok": "PASS", "skipped": "SKIP"}.get(status, "FAIL"),
                       figures + (f" ({result['note']})" if result.get("note") else ""), seconds)
    if status != "ok":
        verdict = "FAIL" if status in ("error", "timeout") or not name.startswith("nockpt") else "SKIP"
        return Outcome(label, part, verdict, f"{status}: {result.get('note', '')}", seconds)
    if target and target.get("result") in ("PASS", "FAIL"):
        return Outcome(label, part, target["result"], f"{figures}; target {target['target']}", seconds)
    return Outcome(label, part, "PASS", figures + ("; tiny model, targets not judged" if dry_run else ""), seconds)


# ------------------------------------------------------------------------------------------------ report

def say(text: str = "") -> None:
    print(text, flush=True)


def table(outcomes: list[Outcome]) -> list[str]:
    lines = [f"{'part':<10} {'path / target':<28} {'result':<12} detail", "-" * 100]
    for o in outcomes:
        lines.append(f"{o.part:<10} {o.name:<28} {o.verdict:<12} {o.detail}")
    return lines


def write_json(path: str, meta: dict, outcomes: list[Outcome], bench: dict | None) -> None:
    data = dict(meta, outcomes=[dataclasses.asdict(o) for o in outcomes],
                failed=[o.name for o in outcomes if o.verdict == "FAIL"], bench=bench)
    temporary = f"{path}.partial"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(temporary, path)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="CUDA paths, memory targets and sd-scripts side by side on one GPU")
    ap.add_argument("--dry-run", dest="dry_run", action="store_true",
                    help="on the CPU with a tiny model: the CUDA-only paths are SKIP (what the tests run)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    ap.add_argument("--budget", type=float, default=450.0, metavar="SECONDS",
                    help="skip a part or configuration whose estimate does not fit what is left (default 450)")
    ap.add_argument("--sd-scripts", dest="sd_scripts", default=None, metavar="PATH",
                    help="an sd-scripts checkout: its step beside ours in the benchmark (part c)")
    ap.add_argument("--parts", default="smoke,bench", help="smoke, bench, or both (default)")
    ap.add_argument("--json", default=None, metavar="FILE", help="the results, rewritten after each part")
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - {"smoke", "bench"}
    if unknown:
        ap.error(f"--parts: expected smoke and/or bench, not {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    meta = dict(device=name, torch=torch.__version__, dry_run=args.dry_run, budget_s=args.budget,
                sd_scripts=args.sd_scripts)
    say(f"bench/gpu_check.py on {name}, torch {torch.__version__}; budget {args.budget:g} s"
        + ("; dry run (tiny model on the CPU)" if args.dry_run else ""))
    started = time.perf_counter()
    outcomes: list[Outcome] = []
    bench_data = None
    if "smoke" in args.parts:
        estimate = DRY_SMOKE_ESTIMATE_S if args.dry_run else SMOKE_ESTIMATE_S
        if estimate > args.budget:
            say(f"(a) smoke: about {estimate:.0f} s estimated; not run (past --budget)")
            outcomes.append(Outcome("smoke", "smoke", "not run", "past --budget"))
        else:
            say(f"(a) smoke: every CUDA path against the plain path, about {estimate:.0f} s estimated")
            outcomes += run_smoke(Env(device, args.dry_run))
        if args.json:
            write_json(args.json, meta, outcomes, bench_data)
    if "bench" in args.parts:
        left = args.budget - (time.perf_counter() - started)
        bench_outcomes, bench_data = run_bench(args, left)
        outcomes += bench_outcomes
    elif args.sd_scripts:
        say("(c) sd-scripts: runs within the bench part, which --parts leaves out")
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        write_json(args.json, meta, outcomes, bench_data)
    say()
    say(f"{name}; torch {torch.__version__}; {meta['elapsed_s']:.0f} s")
    for line in table(outcomes):
        say(line)
    return 1 if any(o.verdict == "FAIL" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())

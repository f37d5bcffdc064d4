"""Fault injection on the CLI: SIGKILL at chosen or random points of caching, training and saving, N times in a row
with resumes, must end with the LoRA of an uninterrupted run, bit for bit, and no partial file left; a disk that
fills up during each kind of save must end the run with one clear error and leave the previous files intact.

Every run is `python -m trainer ...` in a subprocess with tests/faults/ first on PYTHONPATH: its sitecustomize.py
numbers the run's writes, renames and steps (events) and kills the process (SIGKILL, no clean-up runs) or fills
the disk at the event the test asks for; see that file. The disk is filled for real on a small tmpfs where the
tests run as root and may mount one, else through a fake file-system layer (ENOSPC after N bytes).

The default run is a short variant (one chain of chosen kill points, one disk-full per kind of save); the long
ones (random kill points over several seeds and option sets, both file-system layers, first writes and rewrites)
run with `pytest --fault-injection=full tests/test_fault_injection.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainspace import cli_args, make_workspace

REPO = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).resolve().parent / "faults"
NAME = "test_lora"
STEPS = 8
# the brief's options: disk caches, a LoRA and a state every 2 steps, 8 steps (2 epochs of 4 batches)
PERIODIC = ["--output_name", NAME, "--network_dim", "4", "--network_alpha", "4", "--network_train_unet_only",
            "--learning_rate", "2e-3", "--max_train_steps", str(STEPS), "--seed", "3", "--cache_latents",
            "--cache_latents_to_disk", "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk",
            "--save_every_n_steps", "2", "--save_state"]
# with a final `<name>-state` too: a resume from it saves that folder again, through its two renames
FINAL_STATE = PERIODIC + ["--save_state_on_train_end"]
OPTION_SETS = {"periodic": PERIODIC, "final_state": FINAL_STATE}
# what differs between any two runs: when they ran, and sd-scripts' random session id
RUN_KEYS = {"ss_training_started_at", "ss_training_finished_at", "modelspec.date", "ss_session_id"}
NO_SPACE = os.strerror(28)
FULL_FLAG = "--fault-injection=full"
KILLS_SEEN: list[str] = []  # "kind detail (mode)" of every kill of the passing chains, summed up at the end


def _full_variant(request) -> None:
    if request.config.getoption("--fault-injection", default="short") != "full":
        pytest.skip(f"slow fault-injection variant: run with {FULL_FLAG}")


# ---------------------------------------------------------------------------------------------------- running


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    events: list[tuple[str, str]]  # (kind, detail) of every event, in order
    killed: tuple[str, str, str] | None  # (kind, detail, mode) where it was killed
    seconds: float


def run_cli(args: list[str], watch: list[Path], trace: Path, kill: str | None = None, full: dict | None = None,
            timeout: float = 600) -> Run:
    """`python -m trainer args` with the fault hooks watching `watch`; `kill` and `full` as in faults/sitecustomize."""
    trace.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULT_")}
    env.update(PYTHONPATH=os.pathsep.join([str(FAULTS), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               FAULT_WATCH=os.pathsep.join(str(p) for p in watch), FAULT_TRACE=str(trace))
    if kill:
        env["FAULT_KILL"] = kill
    if full:
        env["FAULT_FULL"] = json.dumps(full)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    events, killed = [], None
    for line in trace.read_text().splitlines() if trace.exists() else []:
        fields = line.split("\t")
        if fields[0] == "KILL":
            killed = (fields[2], fields[3], fields[4])
        elif fields[0].isdigit():
            events.append((fields[1], fields[2]))
    return Run(proc.returncode, proc.stdout, proc.stderr, events, killed, time.perf_counter() - started)


def _describe(run: Run) -> str:
    return f"rc {run.rc}\n--- stdout\n{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-3000:]}"


# ---------------------------------------------------------------------------------------------------- checking


def hidden_leftovers(*folders: Path) -> list[str]:
    """Temporaries and half-moved state folders, and any empty or unreadable .safetensors / .npz."""
    found, temporaries = [], []
    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.exists() else []:
            name = path.name
            if any(t in path.parents for t in temporaries):
                continue  # inside one reported already
            if name.startswith(".") or name.endswith((".tmp", ".partial", ".old")) or ".tmp" in name:
                temporaries.append(path)
                found.append(f"{path.relative_to(folder)} (a temporary)")
            elif path.is_file() and name.endswith((".safetensors", ".npz")):
                if path.stat().st_size == 0:
                    found.append(f"{path.relative_to(folder)} (0 bytes)")
                elif not readable(path):
                    found.append(f"{path.relative_to(folder)} (truncated or damaged)")
    return found


def readable(path: Path) -> bool:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                for key in data.files:
                    data[key]
        else:
            load_file(path)
        return True
    except Exception:
        return False


def lora_of(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    return load_file(path), {k: v for k, v in metadata.items() if k not in RUN_KEYS}


def assert_same_tensors(path: Path, reference: Path) -> None:
    got, want = load_file(path), load_file(reference)
    assert sorted(got) == sorted(want), f"{path.name}: other tensor names than {reference}"
    differ = [k for k in want if not (got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]))]
    assert not differ, (f"{path.name} differs from the uninterrupted run's in {len(differ)} of {len(want)} tensors, "
                        f"e.g. {differ[0]}: max |diff| "
                        f"{(got[differ[0]].double() - want[differ[0]].double()).abs().max().item():.3g}")


def visible_files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def snapshot(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics_steps(out: Path) -> list[int]:
    path = out / f"{NAME}_metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------------------- workspace


@pytest.fixture(scope="module", autouse=True)
def kill_summary(request):
    """At the end of the module: which kinds of kill point (and modes) the passing chains went through."""
    yield
    if KILLS_SEEN:
        counts: dict[str, int] = {}
        for kill in KILLS_SEEN:
            kind, mode = kill.split(" ", 1)[0], kill.rsplit("(", 1)[1].rstrip(")")
            counts[f"{kind} ({mode})"] = counts.get(f"{kind} ({mode})", 0) + 1
        line = (f"fault injection: {len(KILLS_SEEN)} kills survived: "
                + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())))
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"\n{line}")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("fault_ws"))


@pytest.fixture(scope="module")
def base_args(ws, tokenizer_dirs):
    return lambda out, cache, options: [*cli_args(ws, tokenizer_dirs, out), "--cache_dir", str(cache), *options]


@pytest.fixture(scope="module")
def references(tmp_path_factory, base_args):
    """The uninterrupted run of each option set (made on first use): its folders and its events."""
    made: dict[str, tuple[Path, Path, list[tuple[str, str]]]] = {}

    def get(options: str):
        if options not in made:
            root = tmp_path_factory.mktemp(f"reference_{options}")
            out, cache = root / "out", root / "cache"
            run = run_cli(base_args(out, cache, OPTION_SETS[options]), [out, cache], root / "trace")
            assert run.rc == 0, _describe(run)
            made[options] = (out, cache, run.events)
        return made[options]

    return get


# ---------------------------------------------------------------------------------------------------- kill chains


def newest_state(out: Path) -> tuple[int, Path] | None:
    """The newest complete state (its step, and the name to pass to --resume) among `<name>[-stepN]-state` and the
    `.partial` / `.old` folders a save stopped between its renames leaves (--resume takes the name and recovers
    them)."""
    best = None
    for path in out.iterdir() if out.exists() else []:
        match = re.fullmatch(rf"{re.escape(NAME)}(-step\d{{8}})?-state(\.partial|\.old)?", path.name)
        if not match or not (path / "state.json").is_file():
            continue
        try:
            step = json.loads((path / "state.json").read_text())["position"]["global_step"]
        except (ValueError, KeyError, TypeError):
            continue
        name = path.name.removesuffix(match[2] or "")
        if best is None or step > best[0] or (step == best[0] and not match[2]):
            best = (step, out / name)
    return best


def events_at_least(reference: list[tuple[str, str]], state_step: int | None) -> int:
    """How many events a run that resumes from a state at `state_step` (None: starts over) makes at least: those
    of the uninterrupted run from its next step on (it may have caches left to write before that, never fewer)."""
    steps = [i for i, (kind, _) in enumerate(reference) if kind == "step"]
    if state_step is None:
        return len(reference) - steps[0]
    if state_step < STEPS:
        return len(reference) - steps[state_step]
    last_metrics = max(i for i, (kind, _) in enumerate(reference) if kind == "metrics")
    return len(reference) - last_metrics - 1  # a resume from the final state saves the final LoRA and state again


@dataclass
class Chain:
    kills: list[str] = field(default_factory=list)  # "kind detail (mode)" of each kill
    resumed_from: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def kill_chain(base_args, root: Path, options: str, plan, reference_events) -> tuple[Chain, Path, Path]:
    """Run, kill, resume (or start over before any state exists), as `plan(attempt, lower_bound)` says: a FAULT_KILL
    value, or None for the last, uninterrupted run."""
    out, cache = root / "out", root / "cache"
    chain = Chain()
    attempt = 0
    while True:
        state = newest_state(out)
        args = base_args(out, cache, OPTION_SETS[options]) + (["--resume", str(state[1])] if state else [])
        kill = plan(attempt, events_at_least(reference_events, state[0] if state else None))
        run = run_cli(args, [out, cache], root / f"trace{attempt}", kill=kill)
        chain.resumed_from.append(state[1].name if state else "-")
        chain.seconds.append(run.seconds)
        if kill is None:
            assert run.rc == 0, f"the last run of the chain {chain.kills} failed: {_describe(run)}"
            return chain, out, cache
        assert run.rc == -9 and run.killed, (f"run {attempt + 1} (FAULT_KILL {kill}) was not killed: "
                                            f"{_describe(run)}")
        chain.kills.append(f"{run.killed[0]} {run.killed[1]} ({run.killed[2]})")
        attempt += 1


def assert_like_uninterrupted(out: Path, cache: Path, reference, chain: Chain) -> None:
    ref_out, ref_cache, _ = reference
    context = f"after kills {chain.kills} (resumed from {chain.resumed_from})"
    leftovers = hidden_leftovers(out, cache)
    assert not leftovers, f"left visible: {leftovers} {context}"
    # the caches first: a latent that differs from the uninterrupted run's explains a LoRA that does
    caches, ref_caches = visible_files(cache), visible_files(ref_cache)
    assert sorted(caches) == sorted(ref_caches), context
    for name, path in caches.items():
        with np.load(path) as got_npz, np.load(ref_caches[name]) as want_npz:
            assert sorted(got_npz.files) == sorted(want_npz.files), name
            differ = [k for k in want_npz.files if not np.array_equal(got_npz[k], want_npz[k])]
            assert not differ, f"cache {name}: {differ} differ from the uninterrupted run's {context}"
    final, ref_final = out / f"{NAME}.safetensors", ref_out / f"{NAME}.safetensors"
    assert_same_tensors(final, ref_final)
    assert lora_of(final)[1] == lora_of(ref_final)[1], f"metadata differs {context}"
    # every other file too: the step LoRAs, the states (LoRA, optimizer, random generators), the metrics log
    files, ref_files = visible_files(out), visible_files(ref_out)
    assert sorted(files) == sorted(ref_files), context
    for name, path in files.items():
        if name.endswith(".safetensors"):
            assert_same_tensors(path, ref_files[name])
    assert metrics_steps(out) == list(range(1, STEPS + 1)), f"metrics log steps {metrics_steps(out)} {context}"
    assert files[f"{NAME}_metrics.jsonl"].read_text() == ref_files[f"{NAME}_metrics.jsonl"].read_text(), context
    KILLS_SEEN.extend(chain.kills)


# chosen kill points, in order; each run resumes from the newest state (or starts over before the first)
SHORT_CHAIN = [
    "latent_npz:3:torn",  # caching latents: the 3rd file's temporary half written
    f"replace@{NAME}-step00000006.safetensors ->:1:before",  # a LoRA save: its temporary complete, not renamed
    f"replace@{NAME}-state.partial -> {NAME}-state:1:before",  # the final state complete as .partial, not moved
]
LONG_CHAIN = [
    "latent_npz:3:torn",
    "text_npz:4:before",  # caching text-encoder outputs
    "step@1:1:before",  # training, step 2: one metrics line written, no state yet (the next run starts over)
    f"state_file@{NAME}-step00000004-state.partial/state.safetensors:1:torn",  # a state save: a file half written
    "step@5:1:before",  # training, step 6
    f"replace@{NAME}-step00000006.safetensors ->:1:before",
    "metrics@7:1:torn",  # a metrics line half written
    f"replace@{NAME}-state.partial -> {NAME}-state:1:before",
    f"replace@{NAME}-state -> {NAME}-state.old:1:after",  # its re-save, between the folder's two renames
    f"replace@{NAME}-state.partial -> {NAME}-state:1:after",  # after both renames, before .old is removed
]


@pytest.mark.parametrize("points", ["short", "long"])
def test_kills_at_chosen_points_then_resume_give_the_uninterrupted_lora(request, base_args, references, tmp_path,
                                                                       points):
    if points == "long":
        _full_variant(request)
    plan = SHORT_CHAIN if points == "short" else LONG_CHAIN
    reference = references("final_state")
    chain, out, cache = kill_chain(base_args, tmp_path, "final_state",
                                   lambda attempt, _: plan[attempt] if attempt < len(plan) else None, reference[2])
    print(f"kills: {chain.kills}; resumed from {chain.resumed_from}; seconds {[round(s, 1) for s in chain.seconds]}")
    assert len(chain.kills) == len(plan)
    assert_like_uninterrupted(out, cache, reference, chain)


@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("seed", range(6))
def test_kills_at_random_points_then_resume_give_the_uninterrupted_lora(request, base_args, references, tmp_path,
                                                                       options, seed):
    _full_variant(request)
    reference = references(options)
    rng = random.Random(seed * 7919 + len(options))
    kills = 4

    def plan(attempt: int, at_least: int) -> str | None:
        return f"{rng.randint(1, at_least)}:{rng.randrange(2**32)}" if attempt < kills else None

    chain, out, cache = kill_chain(base_args, tmp_path, options, plan, reference[2])
    print(f"kills: {chain.kills}; resumed from {chain.resumed_from}; seconds {[round(s, 1) for s in chain.seconds]}")
    assert_like_uninterrupted(out, cache, reference, chain)


# ---------------------------------------------------------------------------------------------------- full disk


def tmpfs_available() -> str | None:
    """None when a tmpfs can be mounted here, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root"
    if shutil.which("mount") is None:
        return "no mount command"
    return None


def mount_tmpfs(root: Path) -> str | None:
    """Mount a 64 MiB tmpfs on `root`; None when done, else why not."""
    why = tmpfs_available()
    if why is None:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)], capture_output=True,
                              text=True)
        why = None if done.returncode == 0 else f"mount failed: {done.stderr.strip() or done.returncode}"
    return why


def unmount(root: Path) -> None:
    subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.fixture
def disk(request, tmp_path):
    """A folder on a 64 MiB tmpfs (layer "tmpfs"), or a plain folder under the fake layer ("fake")."""
    layer = request.param
    _full_variant(request)
    root = tmp_path / "fs"
    root.mkdir()
    if layer == "tmpfs":
        why = mount_tmpfs(root)
        if why:
            pytest.skip(f"tmpfs disk-full needs root and a tmpfs mount ({why}); the fake-layer variant covers it")
    try:
        yield root, layer
    finally:
        if layer == "tmpfs":
            unmount(root)


def _resolution_toml(ws, folder: Path, resolution: int) -> Path:
    toml = folder / "dataset_res.toml"
    toml.write_text(ws["toml"].read_text().replace("resolution = 64", f"resolution = {resolution}"))
    return toml


# Each case: the kind of save, the event the disk fills at (its n-th occurrence), whether it rewrites a file of the
# same name (a copy of the reference run's folders is there first, and the options make that file be written
# again) or writes a new one while earlier ones of its kind exist, and what the error names.
@dataclass(frozen=True)
class FullCase:
    kind: str
    at: str
    nth: int
    rewrite: bool
    target: str  # the file or folder the error line names

    def __str__(self) -> str:
        return f"{self.kind}-{'rewrite' if self.rewrite else 'new'}"


CASES = [
    FullCase("lora", "lora", 1, True, f"{NAME}-step00000002.safetensors"),
    FullCase("state", "state_file", 2, True, f"{NAME}-step00000002-state"),
    FullCase("latent_npz", "latent_npz", 1, True, "blue_circle_0064x0064_flux.npz"),
    FullCase("text_npz", "text_npz", 1, True, "blue_circle_flux_te.npz"),
    FullCase("metrics", "metrics", 1, False, f"{NAME}_metrics.jsonl"),  # the log's first line
    FullCase("lora", "lora", 2, False, f"{NAME}-step00000004.safetensors"),
    FullCase("state", "json", 4, False, f"{NAME}-step00000004-state"),
    FullCase("latent_npz", "latent_npz", 3, False, "green_circle_0064x0064_flux.npz"),
    FullCase("text_npz", "text_npz", 5, False, "red_circle_flux_te.npz"),
    FullCase("metrics", "metrics", 1, True, f"{NAME}_metrics.jsonl"),  # a resumed run's first line, after 6
]
SHORT_CASES = {"lora-rewrite", "state-rewrite", "latent_npz-rewrite", "text_npz-rewrite", "metrics-new"}


def disk_full_run(case: FullCase, root: Path, layer: str, base_args, ws, reference) -> tuple[Run, dict, Path, Path]:
    out, cache = root / "out", root / "cache"
    options = list(FINAL_STATE)
    if case.rewrite:
        shutil.copytree(reference[0], out)
        shutil.copytree(reference[1], cache)
        if case.kind == "latent_npz":  # another bucket size: every latent file gets its entry added
            options += ["--dataset_config", str(_resolution_toml(ws, root.parent, 32))]
        if case.kind == "text_npz":  # another T5 mask setting: every text file is encoded again
            options += ["--apply_t5_attn_mask"]
        if case.kind == "metrics":  # resumed at step 6: the log is cut back to its 6 lines, then appended to
            options += ["--resume", str(out / f"{NAME}-step00000006-state")]
    before = snapshot(out, cache)
    full = {"at": case.at, "nth": case.nth, "room": 0, "layer": layer, "ballast": str(root / "ballast")}
    run = run_cli(base_args(out, cache, options), [out, cache], root.parent / "trace", full=full)
    return run, before, out, cache


@pytest.fixture(scope="module")
def short_disk_runs(tmp_path_factory, base_args, ws, references):
    """The short run's cases, each on its own tmpfs where one can be mounted (else through the fake layer), run two
    processes at a time when the first is asked for: {case: (run, before, out, cache, layer)}."""
    mounted: list[Path] = []
    results: dict[str, Future] = {}

    def get(case: FullCase):
        if not results:
            reference = references("final_state")
            with ThreadPoolExecutor(max_workers=2) as pool:
                for c in (c for c in CASES if str(c) in SHORT_CASES):
                    root = tmp_path_factory.mktemp(f"disk_{c}") / "fs"
                    root.mkdir()
                    layer = "tmpfs" if mount_tmpfs(root) is None else "fake"
                    if layer == "tmpfs":
                        mounted.append(root)
                    results[str(c)] = pool.submit(
                        lambda c=c, root=root, layer=layer: (*disk_full_run(c, root, layer, base_args, ws, reference),
                                                             layer))
        return results[str(case)].result()

    yield get
    for root in mounted:
        unmount(root)


@pytest.mark.parametrize("case", [c for c in CASES if str(c) in SHORT_CASES], ids=str)
def test_a_full_disk_during_each_kind_of_save_ends_with_one_clear_error_and_the_previous_files_intact(
        case, short_disk_runs):
    run, before, out, cache, layer = short_disk_runs(case)
    check_disk_full(case, layer, run, before, out, cache)


@pytest.mark.parametrize("disk", ["tmpfs", "fake"], indirect=True)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_full_disk_during_a_save_ends_with_one_clear_error_and_the_previous_files_intact(
        disk, case, base_args, ws, references):
    root, layer = disk
    if layer == "tmpfs" and case.kind == "metrics" and case.rewrite:
        pytest.skip("an append to the metrics log fills the slack of its last tmpfs page first; the fake layer "
                    "covers it")
    check_disk_full(case, layer, *disk_full_run(case, root, layer, base_args, ws, references("final_state")))


def check_disk_full(case: FullCase, layer: str, run: Run, before: dict[Path, bytes], out: Path, cache: Path) -> None:
    what = f"disk full ({layer}) at {case.at} #{case.nth}"
    assert run.rc == 2, f"{what}: {_describe(run)}"
    errors = re.findall(r"error: [^\r\n]*", run.stderr)
    assert len(errors) == 1 and "Traceback" not in run.stderr, f"{what}: {_describe(run)}"
    error = errors[0]
    assert case.target in error and NO_SPACE in error, f"{what}: {error}"
    # what the error says about the previous file of that name is true
    target = next((p for p in [*out.rglob(case.target), *cache.rglob(case.target)]), None)
    if case.kind == "metrics":  # an append-only log: the lines before stay (those a resume at 6 keeps), no half line
        old = before.get(out / case.target, b"").decode().splitlines(keepends=True)
        text = target.read_text() if target else ""
        assert text == "".join(old[:6] if case.rewrite else old), f"{what}: the log holds {text!r}"
    elif case.rewrite:
        assert target is not None and "intact" in error, f"{what}: {error}"
    else:
        assert ("nothing was written" in error or "no state was saved" in error) and target is None, error
    # every file there before is intact (the one the failed save was for, byte for byte), nothing is partial
    leftovers = hidden_leftovers(out, cache)
    assert not leftovers, f"{what}: left visible: {leftovers}"
    changed = [p for p, data in before.items() if p.exists() and p.read_bytes() != data]
    missing = [p for p in before if not p.exists()]
    assert not missing, f"{what}: files gone: {missing}"
    for path in changed:  # rewritten before the disk filled: complete files (the metrics log: checked above)
        assert (case.target not in str(path) or case.kind == "metrics") and (
            path.suffix not in (".safetensors", ".npz") or readable(path)), f"{what}: {path} changed"
    print(f"{what}: {error}")
    # last, as it is cosmetic: the message is a line of its own, not appended to the progress bar's
    lines = re.split(r"[\r\n]", run.stderr)
    assert any(line.startswith("error: ") for line in lines), (
        f"{what}: the error is printed after the progress bar on the same line: "
        f"{next(line for line in lines if 'error: ' in line)!r}")

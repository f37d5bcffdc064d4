"""bench/gpu_check.py --dry-run on the CPU: every path that can run here runs against the plain path and passes, the
CUDA-only ones are SKIP, one JSON and one table come out; a broken swap is reported FAIL (exit 1); the budget skips
what would not fit."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from trainer.block_swap import BlockSwapRunner

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
CUDA_ONLY = {"control_no_event_wait", "control_no_wait_stream", "fp8_matmul", "fp8_convert_on_device",
             "pinned_registration", "control_pinned_error"}


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


def outcomes(path: Path) -> dict[str, dict]:
    return {o["name"]: o for o in json.loads(path.read_text())["outcomes"]}


def test_dry_run_passes_every_cpu_path_and_writes_one_json_and_one_table(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--json", str(out)]) == 0
    results = outcomes(out)
    assert set(gpu_check.DRY_PATHS) | {"bench:fp8_swap18_1024"} == set(results)
    for name, o in results.items():
        assert o["verdict"] == ("SKIP" if name in CUDA_ONLY else "PASS"), o
    assert "0.00e+00" in results["swap35_ckpt"]["detail"] and "1 double + 1 single" in results["swap35_ckpt"]["detail"]
    data = json.loads(out.read_text())
    assert data["dry_run"] and data["failed"] == [] and data["bench"]["tiny"]
    printed = capsys.readouterr().out
    table = printed[printed.index("part "):].splitlines()
    assert len(table) == 2 + len(results) and all(any(n in line for line in table) for n in results)


def test_a_swap_that_computes_on_stale_slots_fails(gpu_check, tmp_path, monkeypatch):
    real = BlockSwapRunner._load

    def stale(self, key):
        real(self, key)
        if key is not None and key in self._where:
            self._slots[key[0]].flat[self._where[key]].zero_()  # as if the copy had not landed yet

    monkeypatch.setattr(BlockSwapRunner, "_load", stale)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--parts", "smoke", "--json", str(out)]) == 1
    results = outcomes(out)
    assert results["swap35_ckpt"]["verdict"] == results["swap1_nockpt"]["verdict"] == "FAIL"
    assert results["offload"]["verdict"] == "PASS"
    assert set(json.loads(out.read_text())["failed"]) >= {"swap35_ckpt", "swap1_nockpt"}


def test_the_budget_skips_what_would_not_fit(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--budget", "0", "--json", str(out)]) == 0
    results = outcomes(out)
    assert results["smoke"]["verdict"] == "not run" and results["bench:fp8_swap18_1024"]["verdict"] == "not run"
    assert "not run (past --budget)" in capsys.readouterr().out
    chosen, left, total = gpu_check.bench_plan(["ckpt_1024", "swap18_1024", "offload_1024"], 80, False)
    assert chosen == ["ckpt_1024", "swap18_1024"] and left == ["offload_1024"]
    assert total == gpu_check.BENCH_ESTIMATE_S["ckpt_1024"] + gpu_check.BENCH_ESTIMATE_S["swap18_1024"]
    chosen, left, _ = gpu_check.bench_plan(["ckpt_1024", "swap18_1024"], 80, True)  # sd-scripts runs too
    assert chosen == ["ckpt_1024"] and left == ["swap18_1024"]


def test_an_sd_scripts_path_that_is_no_checkout_is_skipped(gpu_check, tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--parts", "bench", "--sd-scripts", str(tmp_path), "--json", str(out)]) == 0
    results = outcomes(out)
    assert results["sd-scripts"]["verdict"] == "SKIP"
    assert "not an sd-scripts checkout" in results["sd-scripts"]["detail"]
    assert results["bench:fp8_swap18_1024"]["verdict"] == "PASS"


def test_parts_are_checked(gpu_check):
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--parts", "smoke,speed"])
    assert torch.get_num_threads() >= 1

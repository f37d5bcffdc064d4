"""bench/memory.py in tiny mode on the CPU: every configuration runs and prints a row of finite numbers, each run
also works as a subprocess of the script, and an sd-scripts it cannot drive is reported and skipped, not a crash."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "memory.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_memory", None)


def table_rows(output: str) -> dict[str, list[str]]:
    """The final table's rows by configuration name, split on whitespace."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("config "))
    return {line.split()[0]: line.split() for line in lines[start + 2:] if line.strip()}


def test_tiny_runs_every_config_with_finite_numbers(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--no-subprocess", "--steps", "1", "--warmup", "1", "--json", str(out)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert list(rows) == list(bench.CONFIGS)
    for name, row in rows.items():
        assert math.isfinite(float(row[1])) and float(row[1]) > 0, row  # our s/step
        assert row[2] == "n/a", row  # no peak memory on the CPU
    data = json.loads(out.read_text())
    assert data["tiny"] and data["device"] == "cpu"
    block_linears = bench.TINY_PARAMS.depth * 10 + bench.TINY_PARAMS.depth_single_blocks * 3
    for result in data["results"]:
        assert result["impl"] == "ours" and result["status"] == "ok", result
        assert math.isfinite(result["s_per_step"]) and math.isfinite(result["loss"]), result
        assert result["peak_gib"] is None and result["layers"] == block_linears
    assert [r["config"] for r in data["results"]] == list(bench.CONFIGS)
    assert set(data["targets"]) == set(bench.TARGETS)


def test_each_run_in_its_own_subprocess(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--configs", "ckpt_512,fp8_swap18_1024",
                           "--steps", "1", "--warmup", "0", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(table_rows(done.stdout)) == {"ckpt_512", "fp8_swap18_1024"}
    data = json.loads(out.read_text())
    assert data["isolation"] == "subprocess per run"
    assert [(r["config"], r["status"]) for r in data["results"]] == [("ckpt_512", "ok"), ("fp8_swap18_1024", "ok")]


@pytest.fixture
def clean_imports(monkeypatch):
    """A fake sd-scripts is imported as `library` / `networks`: forget those modules afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("library", "networks"):
            del sys.modules[name]


def test_sd_scripts_it_cannot_drive_is_skipped_with_a_reason(bench, tmp_path, capsys, clean_imports):
    args = ["--tiny", "--no-subprocess", "--configs", "ckpt_512,fp8_512", "--steps", "1", "--warmup", "0"]
    assert bench.main(args + ["--sd-scripts", str(tmp_path / "nowhere")]) == 0
    output = capsys.readouterr().out
    assert "is not an sd-scripts checkout" in output and "ckpt_512" in table_rows(output)

    fake = tmp_path / "sd-scripts"
    for package, module in (("library", "flux_models"), ("networks", "lora_flux")):
        (fake / package).mkdir(parents=True)
        (fake / package / "__init__.py").write_text("")
        (fake / package / f"{module}.py").write_text("class Flux:\n    pass\n")
    assert bench.main(args + ["--sd-scripts", str(fake)]) == 0
    output = capsys.readouterr().out
    assert "lacks what this bench drives" in output and "enable_block_swap" in output
    assert "skipping its remaining runs" in output
    rows = table_rows(output)
    assert set(rows) == {"ckpt_512", "fp8_512"} and all(math.isfinite(float(r[1])) for r in rows.values())


def test_unknown_config_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--configs", "ckpt_1024,fast"])

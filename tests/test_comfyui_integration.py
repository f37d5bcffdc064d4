"""Against a real ComfyUI (set COMFYUI_DIR; COMFYUI_PYTHON if its Python is not this one)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
PACK = "flux_lora_trainer"

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no real ComfyUI to test against")


def test_pack_loads_in_comfyui_without_errors(tmp_path):
    (tmp_path / "custom_nodes").mkdir()
    (tmp_path / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    run = subprocess.run(
        [COMFYUI_PYTHON, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(tmp_path),
         "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK],
        cwd=COMFYUI_DIR, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    loaded = [line for line in log.splitlines() if line.rstrip().endswith(f"custom_nodes/{PACK}")]
    assert loaded, f"ComfyUI did not report loading the pack:\n{log[-4000:]}"
    assert not any("IMPORT FAILED" in line for line in loaded), "\n".join(loaded)

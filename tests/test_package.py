"""The pack imports the way ComfyUI imports it, fast and without side effects; README and CI agree."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

IMPORT_LIKE_COMFYUI = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("flux_lora_trainer_pack", sys.argv[1] + "/__init__.py",
                                              submodule_search_locations=[sys.argv[1]])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
heavy = sorted(m for m in ("torch", "transformers", "safetensors", "numpy", "PIL", "comfy_api") if m in sys.modules)
print("entrypoint", callable(getattr(module, "comfy_entrypoint", None)), "v1", hasattr(module, "NODE_CLASS_MAPPINGS"),
      "web", module.WEB_DIRECTORY, "heavy", heavy)
"""


def test_pack_imports_like_comfyui_without_heavy_modules():
    out = subprocess.run([sys.executable, "-c", IMPORT_LIKE_COMFYUI, str(REPO)], capture_output=True, text=True,
                         check=True).stdout
    # a V3 entry point and no NODE_CLASS_MAPPINGS beside it (ComfyUI would then read only the V1 mappings)
    assert "entrypoint True v1 False web ./js heavy []" in out, out


def quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:bash|sh)?\n(.*?)```", section, flags=re.S)


def test_readme_quick_start_has_exactly_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert "trainer.demo" in commands[0] and "pytest" in commands[1]


def test_ci_script_runs_the_readme_commands_with_cpu_torch_first():
    ci = (REPO / ".ci" / "run").read_text()
    assert "torch==2.13.0" in ci and "README.md" in ci
    assert ci.index("torch==2.13.0") < ci.index("README.md")

"""The repository imported as a package, the way ComfyUI imports a custom node (so relative imports work)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = "flux_lora_trainer_pack"


def pack(module: str):
    """`module` of the pack, e.g. pack("nodes.paths")."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        root = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = root
        spec.loader.exec_module(root)
    return importlib.import_module(f"{PACK}.{module}")

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FLUX_TRAINER_SHARED", REPO.parent / "shared"))


def _shared(sub: str) -> Path:
    path = SHARED / sub
    if not path.is_dir():
        pytest.fail(f"{path} is missing: the reference tensors and tokenizers live in ../shared beside the checkout "
                    "(or set FLUX_TRAINER_SHARED)")
    return path


@pytest.fixture(scope="session")
def golden() -> Path:
    return _shared("golden")


@pytest.fixture(scope="session")
def tokenizer_dirs() -> dict[str, Path]:
    base = _shared("tokenizers")
    return {"clip_l": base / "clip_l", "t5xxl": base / "t5xxl"}


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    from trainer.models.tiny import write_model_set

    return write_model_set(tmp_path_factory.mktemp("tiny_models"))

# the live ComfyUI server fixture `comfyui` (skips with one line where no ComfyUI is set up; fails under CI)
pytest_plugins = ["comfyui_server"]

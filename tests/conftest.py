from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# reference data the tests need, carried in the repository (tests/reference/README.md says where each came from):
# a fresh clone passes its tests alone; only the ComfyUI snapshot lives outside (comfyui_server.py)
REFERENCE = REPO / "tests" / "reference"


def _reference(sub: str) -> Path:
    path = REFERENCE / sub
    if not path.is_dir():
        pytest.fail(f"{path} is missing: the reference tensors and tokenizers are part of the repository "
                    "(a partial checkout?)")
    return path


@pytest.fixture(scope="session")
def golden() -> Path:
    return _reference("golden")


@pytest.fixture(scope="session")
def tokenizer_dirs() -> dict[str, Path]:
    base = _reference("tokenizers")
    return {"clip_l": base / "clip_l", "t5xxl": base / "t5xxl"}


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    from trainer.models.tiny import write_model_set

    return write_model_set(tmp_path_factory.mktemp("tiny_models"))

@pytest.fixture
def flux_refs(monkeypatch):
    """Weak references to every transformer a run loads (to prove none outlives it)."""
    import weakref

    from trainer import session as session_module

    refs, original = [], session_module.load_flux

    def load_flux(*args, **kwargs):
        model = original(*args, **kwargs)
        refs.append(weakref.ref(model))
        return model

    monkeypatch.setattr(session_module, "load_flux", load_flux)
    return refs


# the live ComfyUI server fixture `comfyui` (skips with one line where no ComfyUI is set up; fails under CI)
pytest_plugins = ["comfyui_server"]


def pytest_addoption(parser):
    parser.addoption("--fault-injection", choices=("short", "full"), default="short",
                     help="tests/test_fault_injection.py: 'short' (default, CI) runs one chain of chosen kill points "
                          "and one disk-full per kind of save; 'full' adds random kill chains over several seeds and "
                          "option sets, both file-system layers, first writes and rewrites (minutes)")

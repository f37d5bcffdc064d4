"""A fresh clone passes its own tests: every file the fixtures hand out is inside the repository (tests/reference),
documented, not git-ignored, and no test reaches for ../shared beside the checkout except for the ComfyUI snapshot
(whose tests skip with one line when it is absent). Cloning and rerunning the whole suite here would be too slow;
this checks what such a run depends on."""

import io
import re
import shutil
import subprocess
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
REFERENCE = TESTS / "reference"
# what the tokenizer loaders read from each folder (transformers' CLIPTokenizer / T5 fast tokenizer)
TOKENIZER_FILES = {"clip_l": ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"),
                   "t5xxl": ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")}


def sources() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if REFERENCE not in p.parents)


def test_fixture_paths_are_inside_the_repository(golden, tokenizer_dirs):
    assert golden.resolve().is_relative_to(REPO) and golden.resolve() == (REFERENCE / "golden").resolve()
    assert set(tokenizer_dirs) == set(TOKENIZER_FILES)
    for kind, folder in tokenizer_dirs.items():
        assert folder.resolve().is_relative_to(REPO), folder
        for name in TOKENIZER_FILES[kind]:
            assert (folder / name).is_file(), folder / name


def test_every_golden_file_a_test_opens_is_carried(golden):
    wanted = set()
    for path in sources():
        wanted |= set(re.findall(r"golden\s*/\s*\"([\w.-]+)\"", path.read_text(encoding="utf-8")))
    assert wanted, "no test opens a golden file: has the fixture been renamed?"
    missing = sorted(name for name in wanted if not (golden / name).is_file())
    assert not missing, f"tests open golden files the repository does not carry: {missing}"


def test_every_reference_file_says_where_it_came_from():
    readme = (REFERENCE / "README.md").read_text(encoding="utf-8")
    golden_readme = (REFERENCE / "golden" / "README.md").read_text(encoding="utf-8")
    for path in sorted(p for p in REFERENCE.rglob("*") if p.is_file()):
        relative = path.relative_to(REFERENCE).as_posix()
        if relative.startswith("golden/"):
            assert path.name == "README.md" or f"`{path.name}`" in golden_readme, relative
        elif relative != "README.md":
            assert f"`{relative}`" in readme or f"`{path.parent.relative_to(REFERENCE).as_posix()}/`" in readme, \
                relative


def shared_folder_uses(path: Path) -> list[str]:
    """Code (not comments) of `path` naming the shared folder: a "shared" path part or $FLUX_TRAINER_SHARED; the
    ComfyUI snapshot (shared/comfyui/...) excepted."""
    found = []
    for token in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        text = token.string
        if token.type == tokenize.STRING:
            text = re.sub(r"shared[/\\]comfyui\b", "", text)
            named = re.search(r"(^|[/\\\"'])shared($|[/\\\"'])", text) or "FLUX_TRAINER_SHARED" in text
        else:
            named = token.type == tokenize.NAME and text in ("SHARED", "FLUX_TRAINER_SHARED")
        if named:
            found.append(f"{path.relative_to(REPO)}:{token.start[0]}: {token.line.strip()}")
    return list(dict.fromkeys(found))


def test_no_test_reads_the_shared_folder_beside_the_checkout():
    """`../shared` is only named for the ComfyUI snapshot (../shared/comfyui/setup.sh)."""
    offending = [use for path in sources() if path.name != Path(__file__).name for use in shared_folder_uses(path)]
    assert not offending, "tests that need ../shared beside the checkout:\n" + "\n".join(offending)


def test_reference_files_are_not_git_ignored():
    """A commit carries them: none is matched by .gitignore (checked where this is a git checkout)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(REPO)) for p in REFERENCE.rglob("*") if p.is_file()]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=REPO, capture_output=True, text=True)
    assert ignored.returncode == 1 and not ignored.stdout, f"git-ignored reference files:\n{ignored.stdout}"

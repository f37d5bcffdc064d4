"""Where the nodes read and write, whatever a shared workflow says: output names that cannot leave our folders,
image folders under ComfyUI's input directory (or typed as absolute paths, only ever read), LoRA copies that never
replace a file, and the state folders a run can resume from.

Pure standard library (no torch, no ComfyUI): the folders are passed in, so tests use temporary ones.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path, PurePosixPath

from ..trainer.config.names import check_file_name
from ..trainer.errors import ConfigError

OUR_FOLDER = "flux_lora_trainer"  # under ComfyUI's output directory
CACHE_FOLDER = "cache"  # under OUR_FOLDER: disk caches of latents and text-encoder outputs
IMAGE_SETS_FOLDER = "image_sets"  # under CACHE_FOLDER: the image-set node's folders
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif", ".jxl"}


def safe_name(name: str, option: str = "output_name") -> str:
    """`name` unchanged if it can only ever name a file inside the folder it is joined to (the core's rule)."""
    return check_file_name(name, option)


def resolve_input_folder(text: str, input_dir: str | os.PathLike, option: str = "image_folder") -> Path:
    """A folder the user typed: relative to ComfyUI's input directory (and never outside it through '..'), or an
    absolute path, which is taken as typed (the nodes only ever read it). It must exist."""
    text = (text or "").strip()
    if not text:
        raise ConfigError(f"{option}: give a folder (relative to ComfyUI's input folder, or an absolute path)")
    if any(ord(c) < 32 for c in text):
        raise ConfigError(f"{option} {text!r}: control characters are not allowed")
    if os.path.isabs(text) or re.match(r"^[A-Za-z]:[\\/]", text):
        folder = Path(text)
    else:
        parts = PurePosixPath(text.replace("\\", "/")).parts
        if ".." in parts or re.match(r"^[A-Za-z]:", text):
            raise ConfigError(f"{option} {text!r}: a relative folder must stay inside ComfyUI's input folder "
                              f"({input_dir}); '..' is not allowed (type an absolute path to read another folder)")
        base = Path(input_dir)
        folder = base.joinpath(*parts)
        if os.path.commonpath([os.path.normpath(base), os.path.normpath(folder)]) != os.path.normpath(base):
            raise ConfigError(f"{option} {text!r}: leaves ComfyUI's input folder {input_dir}")
    if not folder.is_dir():
        raise ConfigError(f"{option} {text!r}: {folder} is not a folder")
    return folder


def resolve_input_file(text: str, input_dir: str | os.PathLike, option: str) -> Path:
    """Like resolve_input_folder, for a file (a dataset TOML)."""
    text = (text or "").strip()
    if os.path.isabs(text) or re.match(r"^[A-Za-z]:[\\/]", text):
        path = Path(text)
    else:
        parts = PurePosixPath(text.replace("\\", "/")).parts
        if not parts or ".." in parts:
            raise ConfigError(f"{option} {text!r}: a relative path must stay inside ComfyUI's input folder "
                              f"({input_dir}); '..' is not allowed")
        path = Path(input_dir).joinpath(*parts)
    if not path.is_file():
        raise ConfigError(f"{option} {text!r}: {path} is not a file")
    return path


def output_root(comfy_output_dir: str | os.PathLike) -> Path:
    return Path(comfy_output_dir) / OUR_FOLDER


def run_folder(comfy_output_dir: str | os.PathLike, output_name: str) -> Path:
    """`<ComfyUI output>/flux_lora_trainer/<output_name>`; the name is checked here too."""
    safe_name(output_name)
    if output_name.lower() == CACHE_FOLDER:
        raise ConfigError(f"output_name {output_name!r}: reserved for the disk caches of {OUR_FOLDER}; pick another")
    return output_root(comfy_output_dir) / output_name


def cache_folder(comfy_output_dir: str | os.PathLike) -> Path:
    return output_root(comfy_output_dir) / CACHE_FOLDER


def state_folders(comfy_output_dir: str | os.PathLike) -> list[str]:
    """State folders our runs saved, as `<run>/<folder>` relative to our output folder, newest first."""
    root = output_root(comfy_output_dir)
    found = []
    try:
        runs = [p for p in root.iterdir() if p.is_dir() and p.name != CACHE_FOLDER]
    except OSError:
        return []
    for run in runs:
        try:
            found += [p for p in run.iterdir()
                      if p.is_dir() and p.name.endswith("-state") and (p / "state.json").is_file()]
        except OSError:
            continue
    found.sort(key=lambda p: (-p.stat().st_mtime, str(p)))
    return [f"{p.parent.name}/{p.name}" for p in found]


def resolve_state_folder(choice: str, comfy_output_dir: str | os.PathLike) -> Path:
    """A `<run>/<folder>` value of the resume combo -> the folder, inside our output folder only."""
    parts = choice.replace("\\", "/").split("/")
    if len(parts) != 2:
        raise ConfigError(f"resume {choice!r}: expected <run>/<state folder> from the list")
    for part in parts:
        safe_name(part, "resume")
    folder = output_root(comfy_output_dir) / parts[0] / parts[1]
    if not folder.is_dir():
        raise ConfigError(f"resume {choice!r}: {folder} does not exist (any more)")
    return folder


def copy_without_overwrite(source: str | os.PathLike, folder: str | os.PathLike, name: str,
                           suffix: str = ".safetensors") -> Path:
    """Copy `source` into `folder` as `<name><suffix>`, or `<name>_2<suffix>`, `_3` ... when taken: the name is
    reserved with an exclusive create, so an existing file is never replaced, even by a concurrent writer."""
    safe_name(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10000):
        target = folder / (f"{name}{suffix}" if n == 1 else f"{name}_{n}{suffix}")
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        except BaseException:
            Path(target).unlink(missing_ok=True)
            raise
        return target
    raise ConfigError(f"{folder}: no free name for {name}{suffix}")


def folder_signature(folders: list[str | os.PathLike], caption_extensions: tuple[str, ...] = ()) -> str:
    """What changes when images or captions are added, removed or edited (names, sizes, times); caches the
    trainer writes beside the images (`*.npz`) are left out, so writing them does not count as a change."""
    import hashlib

    digest = hashlib.sha256()
    keep = _IMAGE_SUFFIXES | {e.lower() for e in caption_extensions} | {".txt", ".caption", ".json"}
    for folder in folders:
        digest.update(str(folder).encode())
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            digest.update(b"missing")
            continue
        for entry in entries:
            if Path(entry.name).suffix.lower() not in keep or not entry.is_file():
                continue
            stat = entry.stat()
            digest.update(f"{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def image_set_root(comfy_output_dir: str | os.PathLike) -> Path:
    """Where the image-set node writes the graph's images (one folder per content hash), beside the disk caches:
    never under ComfyUI's input folder, and not under temp, which ComfyUI empties at start-up."""
    return cache_folder(comfy_output_dir) / IMAGE_SETS_FOLDER


def comfy_tokenizers(comfy_package_dir: str | os.PathLike) -> tuple[str, str]:
    """ComfyUI's own CLIP-L and T5 tokenizer folders (`comfy/sd1_tokenizer`, `comfy/text_encoders/t5_tokenizer`),
    checked for the files the core's tokenizer loader needs."""
    base = Path(comfy_package_dir)
    clip, t5 = base / "sd1_tokenizer", base / "text_encoders" / "t5_tokenizer"
    for folder, needed in ((clip, ("vocab.json", "merges.txt")), (t5, ("tokenizer.json",))):
        missing = [n for n in needed if not (folder / n).is_file()]
        if missing:
            raise ConfigError(f"ComfyUI's tokenizer folder {folder} lacks {', '.join(missing)}: is this ComfyUI "
                              "complete?")
    return str(clip), str(t5)

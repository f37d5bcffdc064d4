"""Open a .safetensors file lazily, after checking that it is one, whole and readable.

Only the JSON header is read up front: names, shapes, dtypes and metadata are known without touching tensor data,
and tensors are then read one at a time. Anything that is not a safetensors file (a folder, a pickle, a GGUF file,
a truncated download) is refused with a message naming the file; a pickle is never unpickled.
"""

from __future__ import annotations

import json
import os
import struct
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ModelFileError

MAX_HEADER_BYTES = 100 * 1024 * 1024
HEADERS_KEPT = 16
_HEADERS: dict[tuple, tuple[dict, int]] = {}  # (path, size, mtime, ctime, inode) -> parsed header, oldest first

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _pickle_kind(head: bytes) -> str | None:
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch checkpoint (zip archive holding a pickle)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    if head.startswith(b"GGUF"):
        return "a GGUF file"
    return None


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike, expected: str = "a .safetensors model file"):
        self.path = Path(path)
        self.expected = expected
        self.header, self.data_start = self._read_header()
        self.metadata: dict[str, str] = self.header.pop("__metadata__", None) or {}
        self._handle = None

    def error(self, found: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {found}; expected {self.expected}.")

    def _read_header(self) -> tuple[dict, int]:
        """The header, parsed once for each version of a file: a run opens its transformer file in the pre-flight,
        the memory plan and the load, and a header can be tens of MB of JSON."""
        p = self.path
        if not p.exists():
            raise ModelFileError(f"{p}: no such file; expected {self.expected}.")
        if p.is_dir():
            raise self.error("is a folder, not a file (give the path of one .safetensors file)")
        stat = p.stat()
        version = (str(p.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
        if version not in _HEADERS:
            _HEADERS[version] = self._parse_header(stat.st_size)
            while len(_HEADERS) > HEADERS_KEPT:
                del _HEADERS[next(iter(_HEADERS))]
        header, data_start = _HEADERS[version]
        return dict(header), data_start

    def _parse_header(self, size: int) -> tuple[dict, int]:
        p = self.path
        try:
            with open(p, "rb") as f:
                head = f.read(8)
                kind = _pickle_kind(head)
                if kind:
                    raise self.error(
                        f"is {kind}, not safetensors. Pickled weights can run code when loaded, so they are never "
                        "opened here; convert the file to .safetensors with a tool you trust"
                    )
                if len(head) < 8:
                    raise self.error(f"is {size} bytes long, too short for a safetensors file")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > min(size - 8, MAX_HEADER_BYTES):
                    raise self.error(
                        f"is not a safetensors file (its first 8 bytes declare a {header_len}-byte header in a "
                        f"{size}-byte file; truncated or another format)"
                    )
                raw = f.read(header_len)
        except OSError as e:
            raise ModelFileError(f"{p}: cannot be read ({e.strerror or e}); expected {self.expected}.") from e
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise self.error(f"has a damaged safetensors header ({e})") from e
        data_start = 8 + header_len
        if data_start + end > size:
            raise self.error(
                f"is truncated: its header declares {end} bytes of tensor data but only {size - data_start} "
                "are present (an interrupted download or copy?)"
            )
        return header, data_start

    @property
    def keys(self) -> list[str]:
        return list(self.header)

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self.header.items()}

    def dtype(self, key: str) -> torch.dtype:
        code = self.header[key]["dtype"]
        if code not in DTYPES:
            raise self.error(f"stores tensor '{key}' as {code}, a type this trainer cannot read")
        return DTYPES[code]

    def nbytes(self, key: str) -> int:
        start, end = self.header[key]["data_offsets"]
        return end - start

    def tensor(self, key: str) -> torch.Tensor:
        if self._handle is None:
            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise self.error(f"cannot be opened as safetensors ({e})") from e
        try:
            return self._handle.get_tensor(key)
        except Exception as e:
            raise self.error(f"tensor '{key}' cannot be read ({e})") from e

    def close(self) -> None:
        self._handle = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

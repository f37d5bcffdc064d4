"""Names that become files: an output name must name a file inside the folder it is joined to, on every OS.
Torch-free, shared by the CLI's config checks and the ComfyUI nodes (whose names come from shared workflows)."""

from __future__ import annotations

from ..errors import ConfigError

MAX_NAME = 100
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", *(f"COM{i}" for i in range(10)),
                    *(f"LPT{i}" for i in range(10))}
FORBIDDEN = set('<>:"|?*/\\')


def check_file_name(name: str, option: str = "output_name") -> str:
    """`name` unchanged if it can only ever name a file inside the folder it is joined to; else a ConfigError naming
    the option and the reason. Nothing is rewritten silently."""
    def refuse(why: str):
        raise ConfigError(f"{option} {name!r}: {why}; use letters, digits, '-', '_' or '.' inside the name")

    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{option}: a name is required")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        refuse("control characters are not allowed")
    bad = sorted({c for c in name if c in FORBIDDEN})
    if bad:
        refuse(f"{' '.join(bad)} cannot appear in a file name (no folders, drives or absolute paths)")
    if ".." in name:
        refuse("'..' is not allowed")
    if name != name.strip() or name.endswith("."):
        refuse("leading or trailing spaces and a trailing '.' are not allowed")
    if name.startswith("."):
        refuse("a name cannot start with '.'")
    if name.split(".")[0].upper().rstrip() in WINDOWS_RESERVED:
        refuse("it is a reserved device name on Windows")
    if len(name) > MAX_NAME:
        refuse(f"longer than {MAX_NAME} characters")
    return name

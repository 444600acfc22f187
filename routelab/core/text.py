"""Reading text files for corpora (the lab's training text and the text that traces record)."""

from __future__ import annotations

from pathlib import Path

BINARY_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a binary file (git looks at 8000 bytes)


def read_text(path: Path) -> str | None:
    """The file as UTF-8 text, or None for binary files (a NUL byte in the first
    ``BINARY_SNIFF_BYTES``) and files that are not valid UTF-8."""
    data = Path(path).read_bytes()
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None

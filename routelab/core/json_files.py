"""Reading JSON files and append-only JSON-lines logs, with errors that name the file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from routelab.core.errors import InputError


def read_jsonl_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (``[]`` when it does not exist).

    Only the last line may be unreadable: a process killed while appending leaves a cut
    row there, which is dropped. An unreadable line anywhere else means the file was
    damaged or written by two processes, and dropping it would silently lose data, so it
    raises ``InputError`` naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise InputError(
                f"{str(path)!r} line {number} is not valid JSON ({error.msg}); the file is damaged. Restore it, or "
                "start the run again in a new folder."
            ) from None
        if not isinstance(row, dict):
            raise InputError(f"{str(path)!r} line {number} is not a JSON object; the file is damaged.")
        rows.append(row)
    return rows


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """``json.load`` of ``path``; an unreadable or damaged file raises ``InputError`` naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} {str(path)!r} does not exist.") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {str(path)!r} is not text (binary data); the file is damaged.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(
            f"{what} {str(path)!r} is not valid JSON ({error.msg} at line {error.lineno}); the file is damaged."
        ) from None

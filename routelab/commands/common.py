"""What every command shares: the one way a command fails, and the parser of integer lists.

Every failure a user can cause or fix ends the same way: one ``error: ...`` line on stderr
(never wrapped, whatever the terminal width) and exit code 2. ``RoutelabGroup`` (the class
of the ``routelab`` command group) turns into that line: routelab errors (bad settings,
bad inputs), click's usage errors (a value of the wrong type, a missing option), and
operating-system errors while reading or writing files (a read-only folder, a full disk).
Ctrl-C ends with a hint to resume and exit code 130. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno
import math
from pathlib import Path
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

try:  # typer >= 0.24 carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer on click
    from click import exceptions as click_exceptions

from routelab.core.errors import ConfigError, RoutelabError

USAGE_EXIT_CODE = 2
INTERRUPT_EXIT_CODE = 130


def one_line(message: str) -> str:
    """``message`` on one line: its lines joined by ``; `` (by a space after a line ending in
    ``:``) and runs of spaces folded."""
    lines = [" ".join(line.split()) for line in message.splitlines()]
    out = ""
    for line in filter(None, lines):
        out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out


def os_error_message(error: OSError) -> str:
    """What went wrong with which file, and what to do about it."""
    path = error.filename if error.filename is not None else "a file"
    where = repr(str(path)) if error.filename is not None else path
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device while writing {where} ({reason}); free some space and run the same "
                "command again (train and trace continue with --resume; what was saved before is intact).")
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"cannot write {where}: {reason}; choose a writable location (--out, --out-dir, --cache-dir or "
                "$ROUTELAB_CACHE) or fix its permissions.")
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"{where}: {reason} (check the path and that its folder exists)."
    if error.errno == errno.EISDIR:
        return f"{where} is a folder, not a file."
    return f"{reason}: {where}."


def error_message(error: BaseException) -> str:
    """The one-line message of an error a command ends with."""
    if isinstance(error, click_exceptions.UsageError):
        command = error.ctx.command_path if error.ctx is not None else "routelab"
        return one_line(f"{error.format_message()} (see `{command} --help`)")
    if isinstance(error, OSError):
        return one_line(os_error_message(error))
    return one_line(str(error))


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with code 2."""
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(USAGE_EXIT_CODE)


def _shows_help(error: Exception) -> bool:
    """click's "no arguments: print the help" signal (a UsageError since click 8.2)."""
    no_args = getattr(click_exceptions, "NoArgsIsHelpError", None)
    return no_args is not None and isinstance(error, no_args)


class RoutelabGroup(TyperGroup):
    """The ``routelab`` command group: every command's failures end as one error line."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except click_exceptions.UsageError as error:
            if _shows_help(error):
                raise
            fail(error_message(error))
        except (RoutelabError, OSError) as error:
            fail(error_message(error))
        except KeyboardInterrupt:
            typer.echo("stopped; run the same command again to continue (train and trace: add --resume).", err=True)
            raise typer.Exit(INTERRUPT_EXIT_CODE) from None


def parse_int_list(text: str | None, flag: str, *, minimum: int | None = None) -> list[int] | None:
    """``"1,2,3"`` -> ``[1, 2, 3]`` for a comma-separated integer flag (``None`` stays ``None``).

    Raises ``ConfigError`` naming ``flag`` for an empty list, a non-integer or a value below
    ``minimum``.
    """
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise ConfigError(f"{flag} is empty; give comma-separated integers, e.g. {flag} 1,2.")
    try:
        values = [int(item) for item in items if item]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} must be comma-separated integers, e.g. {flag} 1,2.") from None
    if minimum is not None and any(v < minimum for v in values):
        raise ConfigError(f"{flag} {text!r}: every value must be >= {minimum}.")
    return values


def check_at_least(flag: str, value: float | None, minimum: float, *, strict: bool = False) -> None:
    """Refuse a numeric flag below ``minimum`` (or not above it, with ``strict``); ``None`` passes."""
    if value is None:
        return
    bad = value <= minimum if strict else value < minimum
    if bad or not math.isfinite(value):
        relation = ">" if strict else ">="
        raise ConfigError(f"{flag} must be a finite number {relation} {minimum:g}, got {value:g}.")


def check_device(device: str, flag: str = "--device") -> None:
    """Refuse a device string torch cannot parse or a device this machine does not have."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{flag} {device!r} is not a torch device; use cpu, cuda, cuda:1, mps, ...") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{flag} {device!r}: this torch has no usable CUDA device here; use {flag} cpu.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ConfigError(f"{flag} {device!r}: there are only {torch.cuda.device_count()} CUDA device(s).")
    if parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{flag} {device!r}: MPS is not available here; use {flag} cpu.")


def check_trace_target(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Check ``--out``/``--resume``/``--overwrite`` of a tracing command before any work."""
    from routelab.core.run_lock import LOCK_FILE

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the trace at --out, or replace it.")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder; a trace is a folder (e.g. run.trace).")
    has_content = out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir())
    if resume and not has_content:
        raise ConfigError(f"--resume: there is no trace at --out {str(out)!r} to continue; drop --resume to start one.")
    if not resume and not overwrite and has_content:
        raise ConfigError(
            f"--out {str(out)!r} already exists and is not empty; pass --resume to continue it or --overwrite to "
            "replace it."
        )

"""Output paths of the benchmark commands, checked as options are parsed: a path that
cannot be written was found once the work was done (minutes to hours), as a traceback,
and the results were lost."""

from __future__ import annotations

from pathlib import Path

import typer


def writable_file(path: Path | None) -> Path | None:
    """A typer callback for a file option (``--json``): not a directory, and its directory
    exists or can be made (made now)."""
    if path is None:
        return None
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a directory, not a file")
    _made_directory(path.parent)
    return path


def not_a_file(path: Path | None) -> Path | None:
    """A typer callback for a directory option (``--out``): not an existing file (made
    when the results are written)."""
    if path is not None and path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{path} is a file, not a directory")
    return path


def _made_directory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise typer.BadParameter(f"cannot make {directory}: {error.strerror or error}") from None

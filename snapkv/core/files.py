"""Writing a file or folder atomically: the one way the toolkit writes anything another process may read.

`atomic_path(path)` yields a temporary sibling to write; when the block ends without error it replaces `path`,
otherwise it is removed. A reader sees `path` as it was or complete, never half-written, and nothing is left
behind on a failure. Each call gets its own temporary name, so concurrent writers never share one.
"""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path, *, folder: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (a file name, or with `folder` an empty folder) to write; on success
    it is renamed to `path`, on an error it is removed. The temporary file keeps `path`'s suffix (tools such as
    matplotlib's savefig read the format from it). Makes `path`'s parent folder.

    replace: when `path` exists by the end, replace it (True), or (False) keep it and drop what was written: a
    concurrent writer that got there first wins (a folder cache whose writers all write complete folders).

        with atomic_path(out / "results.json") as partial:
            partial.write_text(text)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(handle)
        temporary = Path(name)
    try:
        yield temporary
        temporary.chmod(0o755 if folder else 0o644)  # mkdtemp and mkstemp make it owner-only
        if not replace:
            _rename_unless_there(temporary, path)
        elif folder and path.exists():
            _replace_folder(temporary, path)
        else:
            os.replace(temporary, path)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists():
            temporary.unlink(missing_ok=True)


def _rename_unless_there(temporary: Path, path: Path) -> None:
    """Rename `temporary` to `path` unless `path` exists (then `temporary` is left to be removed)."""
    if path.exists():
        return
    try:
        os.rename(temporary, path)
    except OSError:
        if not path.exists():  # else a concurrent writer got there between the check and the rename
            raise


def _replace_folder(temporary: Path, path: Path) -> None:
    """Rename `temporary` to `path`, an existing folder (which a rename cannot replace): move that aside first,
    and back when the rename fails."""
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
    try:
        os.replace(path, old / path.name)
        try:
            os.replace(temporary, path)
        except OSError:
            os.replace(old / path.name, path)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (see `atomic_path`); returns `path`."""
    with atomic_path(path) as partial:
        partial.write_text(text, encoding=encoding)
    return Path(path)

"""Files only the hub's own user may read: the database, its credentials, TLS keys.

Another local user must not read message text, password hashes or keys from the data
directory, whatever the umask the hub was started with. Directories are made 0700 and files
0600 explicitly (a mode given to ``mkdir``/``open`` is only an upper bound under the umask),
and a data directory written by an older version is tightened in place at start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
# What a child process (the database) creates is private from the start: no window in
# which a new file exists with the default 0644.
PRIVATE_UMASK = 0o077


def private_dir(path: Path) -> Path:
    """``path`` as a directory of mode 0700 (parents created 0700 too where missing)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=PRIVATE_DIR)
        os.chmod(directory, PRIVATE_DIR)
    os.chmod(path, PRIVATE_DIR)
    return path


def tighten_tree(root: Path) -> int:
    """Make every directory under ``root`` 0700 and every file 0600; returns how many
    entries changed. Symbolic links are left alone (and not followed)."""
    changed = 0
    for directory, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(directory, name)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue  # gone in the meantime (the database's temporary files)
            if stat.S_ISLNK(info.st_mode):
                continue
            wanted = PRIVATE_DIR if stat.S_ISDIR(info.st_mode) else PRIVATE_FILE
            if stat.S_IMODE(info.st_mode) == wanted:
                continue
            try:
                os.chmod(path, wanted)
                changed += 1
            except OSError as exc:  # not ours (another owner): say so, do not stop the start
                log.warning("cannot make %s private (mode %o): %s", path, wanted, exc)
    return changed


def open_private(path: Path, flags: int) -> int:
    """An fd on ``path`` opened with ``flags`` (plus O_CREAT), mode 0600 from the start."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)  # an existing file keeps its old mode otherwise
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data``, mode 0600, synced to disk: a crash leaves the
    old content or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

"""Removing what a sandboxed run left: any depth, any permissions, never following links.

A candidate may build a directory tree thousands of levels deep, make directories unreadable or
move them while it still runs; removal walks the tree with a loop (no recursion), one directory
descriptor open at a time, and stays inside the sandbox's directory whatever happens.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger(__name__)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _remove_tree(path: Path) -> None:
    """Delete ``path`` and everything below it; logs instead of raising."""
    try:
        _remove_tree_iteratively(str(path))
    except OSError as exc:
        logger.warning("could not remove sandbox directory %s: %s", path, exc)


def _remove_tree_iteratively(top: str) -> None:
    """Depth-first removal with an explicit stack and one directory open at a time.

    Recursion (``shutil.rmtree`` in Python 3.11) fails on a program's 3,000-level tree, and an fd
    per level would run out of descriptors. Going back up through ``..`` is checked against the
    device and inode recorded on the way down, so a directory moved away meanwhile (by a program
    still running in "rlimits" mode) stops the removal instead of steering it outside ``top``.
    """
    parent_fd = os.open(os.path.dirname(top), _DIR_FLAGS)
    try:
        try:
            current = _open_dir(os.path.basename(top), parent_fd)
        except FileNotFoundError:
            return
        # One entry per level: (device and inode of the directory, subdirectories left, its name).
        levels = [(_identity(current), _remove_files(current), os.path.basename(top))]
        try:
            while levels:
                _, subdirs, name = levels[-1]
                if subdirs:
                    child_name = subdirs.pop()
                    try:
                        child = _open_dir(child_name, current)
                    except FileNotFoundError:
                        continue
                    os.close(current)
                    current = child
                    levels.append((_identity(current), _remove_files(current), child_name))
                    continue
                levels.pop()
                if not levels:
                    break
                up = os.open("..", _DIR_FLAGS, dir_fd=current)
                os.close(current)
                current = up
                if _identity(current) != levels[-1][0]:
                    raise OSError(f"a directory under {top} was moved while it was being removed")
                os.rmdir(name, dir_fd=current)
        finally:
            os.close(current)
        os.rmdir(os.path.basename(top), dir_fd=parent_fd)
    finally:
        os.close(parent_fd)


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _open_dir(name: str, dir_fd: int) -> int:
    """Open directory ``name`` in ``dir_fd`` without following links, making it readable if needed."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:  # a program running as our uid chmod-ed it 000
        handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            if stat.S_ISDIR(os.fstat(handle).st_mode):
                os.chmod(f"/proc/self/fd/{handle}", stat.S_IRWXU)
        finally:
            os.close(handle)
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _remove_files(dir_fd: int) -> list[str]:
    """Unlink everything but subdirectories in ``dir_fd``; return the subdirectories' names."""
    with contextlib.suppress(OSError):
        os.fchmod(dir_fd, stat.S_IRWXU)  # a read-only directory keeps its entries
    subdirs = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=dir_fd)
    return subdirs

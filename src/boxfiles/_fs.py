"""Blocking walks over directory descriptors, shared by the client's
placement and the server's: nothing is resolved by path, a symlink is never
followed, and a walk holds one descriptor whatever the tree's depth (no
recursion per level). Run in a worker thread.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any, final

#: Flags for opening a directory during a walk; O_NOFOLLOW makes a component
#: swapped for a symlink after it was checked fail instead of being followed.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@final
class DirCursor:
    """One open directory of a tree, moved down and up by name.

    A walk that kept an fd per level would hold as many as the tree is deep;
    this holds one whatever the depth. Going up opens ``..`` and checks it is
    the directory it came down from (a directory moved meanwhile is an
    error, never a way out of the tree).
    """

    def __init__(self, fd: int) -> None:
        #: The current directory; owned by the cursor (a dup of the start).
        self.fd = os.dup(fd)
        #: Names walked down from the start.
        self.path: list[str] = []
        self._above: list[tuple[int, int]] = []

    def close(self) -> None:
        os.close(self.fd)

    def down(self, name: str) -> None:
        child = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        st = os.fstat(self.fd)
        os.close(self.fd)
        self.fd = child
        self._above.append((st.st_dev, st.st_ino))
        self.path.append(name)

    def up(self) -> str:
        """Go to the parent; return the name of the directory just left."""
        parent = os.open("..", DIR_FLAGS, dir_fd=self.fd)
        st = os.fstat(parent)
        if (st.st_dev, st.st_ino) != self._above[-1]:
            os.close(parent)
            raise FileNotFoundError(errno.ENOENT, "moved during the walk", "/".join(self.path))
        os.close(self.fd)
        self.fd = parent
        self._above.pop()
        return self.path.pop()

    def go(self, path: list[str]) -> int:
        """Move to ``path`` (names from the start) and return the fd."""
        common = 0
        while common < min(len(path), len(self.path)) and path[common] == self.path[common]:
            common += 1
        while len(self.path) > common:
            self.up()
        for name in path[common:]:
            self.down(name)
        return self.fd


@final
class TreeWalk:
    """Pre-order walk of a directory tree that never follows a symlink and
    holds one directory fd (a :class:`DirCursor`) whatever the depth.

    Iterating yields ``(name, st, leaving)``: each entry of the current
    directory ``fd`` (``leaving`` false; call :meth:`descend` to walk into a
    directory), and after a descended directory's last entry, its name and
    stat again with ``leaving`` true, once the walk is back in its parent.
    No recursion: a tree deeper than Python's recursion limit is walked all
    the same. ``names`` limits the start directory to those entries.
    """

    def __init__(self, fd: int, *, ordered: bool = False, names: list[str] | None = None) -> None:
        self._cursor = DirCursor(fd)
        self._ordered = ordered
        # Per level: the directory's stat and the names still to visit
        # (None until listed).
        self._todo: list[tuple[os.stat_result, list[str] | None]] = [
            (os.fstat(fd), None if names is None else sorted(names, reverse=True))
        ]

    @property
    def fd(self) -> int:
        return self._cursor.fd

    @property
    def path(self) -> list[str]:
        """Names walked down from the start to the current directory."""
        return self._cursor.path

    def close(self) -> None:
        self._cursor.close()

    def descend(self, name: str) -> int:
        """Walk into the directory ``name`` next; return its fd."""
        self._cursor.down(name)
        # Listed when reached, so the caller may chmod it first.
        self._todo.append((os.fstat(self._cursor.fd), None))
        return self._cursor.fd

    def __iter__(self) -> Iterator[tuple[str, os.stat_result, bool]]:
        while self._todo:
            st, todo = self._todo[-1]
            if todo is None:
                todo = os.listdir(self._cursor.fd)
                if self._ordered:
                    todo.sort(reverse=True)  # popped from the end: ascending
                self._todo[-1] = (st, todo)
            if not todo:
                self._todo.pop()
                if self._todo:
                    yield self._cursor.up(), st, True
                continue
            name = todo.pop()
            try:
                child = os.stat(name, dir_fd=self._cursor.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone since the listing
            yield name, child, False


def remove_tree(dir_fd: int, name: str) -> None:
    """Remove ``name`` inside ``dir_fd`` and everything under it (nothing
    when it is missing), never following a symlink, holding one fd whatever
    the depth (shutil.rmtree takes dir_fd only from Python 3.11, and
    recurses)."""
    walk = TreeWalk(dir_fd, names=[name])
    try:
        for child, child_st, leaving in walk:
            if leaving:
                os.rmdir(child, dir_fd=walk.fd)
            elif stat.S_ISDIR(child_st.st_mode):
                # An archive may have made a directory read-only, or
                # unreadable; its owner may still chmod it, before opening it.
                os.chmod(child, 0o700, dir_fd=walk.fd)
                walk.descend(child)
            else:
                os.unlink(child, dir_fd=walk.fd)
    finally:
        walk.close()


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """``name``'s own stat in ``dir_fd``, or None when it does not exist."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


@final
class Journal:
    """Undo steps for placement, run in reverse when placement fails.

    A step is a function and its arguments, kept flat in one tuple: a merge
    journals a step per entry, and a closure per step (its cells, its own
    copy of the path) cost several times as much.
    """

    def __init__(self) -> None:
        self._undo: list[tuple[Any, ...]] = []

    def did(self, undo: Callable[..., None], *args: Any) -> None:
        self._undo.append((undo, *args))

    def roll_back(self) -> None:
        errors: list[OSError] = []
        for step in reversed(self._undo):
            try:
                step[0](*step[1:])
            except OSError as err:  # keep undoing the rest
                errors.append(err)
        self._undo.clear()
        if errors:
            raise errors[0]


def cursor_at(dir_fd: int, parts: list[str]) -> DirCursor:
    """A cursor at ``parts`` below ``dir_fd`` (which stays the caller's)."""
    cursor = DirCursor(dir_fd)
    try:
        cursor.go(parts)
    except BaseException:
        cursor.close()
        raise
    return cursor

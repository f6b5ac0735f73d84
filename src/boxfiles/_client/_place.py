"""copy_out's placement: the staged tree moved into the destination over
directory descriptors, every step journalled and undone on failure.

Nothing found in the destination is ever followed: each directory is
opened by name with O_NOFOLLOW from an open parent, and every other call
takes a parent's descriptor and a single name (a symlink there is the
entry itself, and is replaced like a file). Only ``dest`` itself is a path,
resolved as the caller gave it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import final

from .._errors import LocalIOError
from .._fs import DIR_FLAGS, DirCursor, Journal, cursor_at, lstat_at

#: Directory descriptors placement holds at once, whatever the tree's depth:
#: the destination's directory, the staging directory's trash, one cursor in
#: the staged tree and one in the destination, and one more being opened or
#: listed. A walk keeps names, not descriptors, for the levels above it.
MAX_PLACE_FDS = 6


def _set_dir_meta(dir_fd: int, name: str, mode: int, times: tuple[int, int]) -> None:
    """chmod and utime a directory through a descriptor (a chmod by name
    would follow a symlink swapped in meanwhile)."""
    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
        os.utime(fd, ns=times)
    finally:
        os.close(fd)


@final
@dataclass
class _Level:
    """One directory of a merge walk: the staged names still to move, where
    it is (below the destination's directory), and the mode and times it
    gets once its entries are in (None for the merge's own top)."""

    names: list[str]
    parts: list[str]
    meta: tuple[int, tuple[int, int]] | None


@final
class Placement:
    """Moves the staged tree into the destination, undoably.

    Everything is addressed from ``base_fd`` (the destination directory, or
    the one ``dest`` is to appear in) by lists of names. What placement
    replaces goes to the trash in the staging directory, so that on failure
    every step is undone in reverse (see :class:`Journal`) and the
    destination is left as it was, modes and times included; on success the
    trash is removed with the staging.
    """

    def __init__(self, base_fd: int, base_shown: str, trash_fd: int) -> None:
        self._base = base_fd
        self._shown = base_shown
        self._trash = trash_fd
        self._spares = 0
        self.journal = Journal()
        self._from_trash_step = self._from_trash
        self._move_out_step = self._move_out

    def _show(self, parts: list[str]) -> str:
        return os.path.join(self._shown, *parts)

    def _spare(self) -> str:
        self._spares += 1
        return str(self._spares)

    # Undo steps are journalled as a method and its arguments (see
    # Journal): ``parent``, the names of an entry's directory, is one list
    # shared by the directory's entries, and the steps taken per entry use
    # bound methods made once, in __init__, rather than one per step.

    def _to_trash(self, dir_fd: int, parent: list[str], name: str) -> None:
        """Move the existing ``name`` (in ``parent``) out of the way."""
        spare = self._spare()
        os.rename(name, spare, src_dir_fd=dir_fd, dst_dir_fd=self._trash)
        self.journal.did(self._from_trash_step, parent, name, self._spares)

    def _from_trash(self, parent: list[str], name: str, spare: int) -> None:
        cursor = cursor_at(self._base, parent)
        try:
            os.rename(str(spare), name, src_dir_fd=self._trash, dst_dir_fd=cursor.fd)
        finally:
            cursor.close()

    def _move_in(
        self,
        src_fd: int,
        src: str,
        dst_fd: int,
        parent: list[str],
        name: str,
        st: os.stat_result,
    ) -> None:
        """Move the staged ``src`` to ``name`` in ``parent`` (free now), with
        its mode and times: a directory changing parent must be writable (its
        ".." changes), and that change touches its mtime."""
        is_dir = stat.S_ISDIR(st.st_mode)
        if is_dir:
            os.chmod(src, 0o700, dir_fd=src_fd)  # staged by us: a directory, not a link
        os.rename(src, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        self.journal.did(self._move_out_step, parent, name)
        if is_dir:
            _set_dir_meta(dst_fd, name, stat.S_IMODE(st.st_mode), times_of(st))

    def _move_out(self, parent: list[str], name: str) -> None:
        cursor = cursor_at(self._base, parent)
        try:
            os.rename(name, self._spare(), src_dir_fd=cursor.fd, dst_dir_fd=self._trash)
        finally:
            cursor.close()

    def _keep_meta(self, parts: list[str], st: os.stat_result) -> None:
        """Have an undo put back an existing directory's mode and times
        (entries moving in and out change its mtime)."""
        self.journal.did(self._put_meta, parts, stat.S_IMODE(st.st_mode), times_of(st))

    def _put_meta(self, parts: list[str], mode: int, times: tuple[int, int]) -> None:
        cursor = cursor_at(self._base, parts)
        try:
            os.fchmod(cursor.fd, mode)
            os.utime(cursor.fd, ns=times)
        finally:
            cursor.close()

    def place(
        self, src_parts: list[str], kind: str, name: str, meta: tuple[int, int | None]
    ) -> None:
        """Put the staged entry at ``src_parts`` (of ``kind``) at ``name`` in
        the base directory ("": merge it into the base directory itself);
        ``meta`` is a new directory's mode and mtime (None: leave it)."""
        if not name:
            self._merge(src_parts, [])
            return
        shown = self._show([name])
        st = lstat_at(self._base, name)
        if kind != "dir":
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise LocalIOError(f"cannot overwrite directory {shown} with a non-directory")
            src = cursor_at(self._base, src_parts[:-1])
            try:  # replaces a file or a symlink (never what it points to) at once
                os.rename(src_parts[-1], name, src_dir_fd=src.fd, dst_dir_fd=self._base)
            finally:
                src.close()
            return
        if st is not None and stat.S_ISDIR(st.st_mode):
            self._merge(src_parts, [name])
            return
        if st is not None and not stat.S_ISLNK(st.st_mode):
            raise LocalIOError(f"cannot overwrite non-directory {shown} with a directory")
        if st is not None:  # a symlink is replaced, never followed
            self._to_trash(self._base, [], name)
        src = cursor_at(self._base, src_parts[:-1])
        try:
            staged = os.stat(src_parts[-1], dir_fd=src.fd, follow_symlinks=False)
            mode, mtime = meta
            times = (staged.st_atime_ns, staged.st_mtime_ns if mtime is None else mtime)
            self._move_in(src.fd, src_parts[-1], self._base, [], name, staged)
        finally:
            src.close()
        _set_dir_meta(self._base, name, mode, times)

    def _merge(self, src_parts: list[str], dst_parts: list[str]) -> None:
        """Move the staged directory's entries into the existing directory at
        ``dst_parts``, level by level (no recursion, two cursors)."""
        # Entries leave staged directories, even ones 0o555 in the box; a
        # 0o000 one could not even be opened (unless root).
        os.chmod(os.path.join(*src_parts), 0o700, dir_fd=self._base)
        src = cursor_at(self._base, src_parts)
        try:
            dst = cursor_at(self._base, dst_parts)
            try:
                self._keep_meta(dst_parts, os.fstat(dst.fd))
                self._walk_merge(src, dst, dst_parts)
            finally:
                dst.close()
        finally:
            src.close()

    def _walk_merge(self, src: DirCursor, dst: DirCursor, top: list[str]) -> None:
        levels = [_Level(sorted(os.listdir(src.fd), reverse=True), top, None)]
        while levels:
            level = levels[-1]
            if not level.names:
                levels.pop()
                if level.meta is not None:
                    os.fchmod(dst.fd, level.meta[0])
                    os.utime(dst.fd, ns=level.meta[1])
                if levels:
                    src.up()
                    dst.up()
                continue
            name = level.names.pop()
            staged = os.stat(name, dir_fd=src.fd, follow_symlinks=False)
            existing = lstat_at(dst.fd, name)
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                parts = [*level.parts, name]
                if not stat.S_ISDIR(staged.st_mode):
                    raise LocalIOError(
                        f"cannot overwrite directory {self._show(parts)} with a non-directory"
                    )
                self._keep_meta(parts, existing)
                os.chmod(name, 0o700, dir_fd=src.fd)  # as in _merge
                src.down(name)
                dst.down(name)
                meta = (stat.S_IMODE(staged.st_mode), times_of(staged))
                levels.append(_Level(sorted(os.listdir(src.fd), reverse=True), parts, meta))
                continue
            if existing is not None:  # a file or a symlink: replaced, never followed
                self._to_trash(dst.fd, level.parts, name)
            self._move_in(src.fd, name, dst.fd, level.parts, name, staged)


def times_of(st: os.stat_result) -> tuple[int, int]:
    return st.st_atime_ns, st.st_mtime_ns

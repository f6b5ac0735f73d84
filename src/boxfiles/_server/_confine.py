"""Path resolution confined to a container root, as openat2's RESOLVE_IN_ROOT.

Every path is walked one component at a time from a directory file
descriptor, opening each directory with O_NOFOLLOW and expanding symlinks by
hand: an absolute target restarts at the root, and ``..`` never climbs above
it. A check on the path string alone is not confinement (the filesystem can
disagree with it); a walk over file descriptors is. Blocking: run in a worker
thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
from dataclasses import dataclass, field
from typing import Literal, final

from .._errors import InvalidArgument, NotFound
from .._fs import DIR_FLAGS, DirCursor, remove_tree

#: Symlinks expanded in one walk before giving up, as Linux's MAXSYMLINKS.
MAX_LINKS = 40

#: Prefix of the staging directories an upload creates (beside or inside its
#: destination); reserved: no path, archive entry or link target may use it.
STAGING_PREFIX = ".boxfiles-staging-"

#: Most directory fds one transfer holds open at once, whatever the depth of
#: the trees it walks: every walk moves one fd per tree (DirCursor) rather
#: than keeping one per level. Counted: root, staging host, staging, staged
#: tree, extraction parent cache and its walk, the file being written,
#: destination, trash, the merge's two cursors and one being opened, the
#: undo cursor, created parents; a few spare. A merge that reaches into
#: other mounts (volumes) holds one more per mount (its trash there).
MAX_FDS = 16


def components(path: str) -> list[str]:
    """The meaningful components of ``path`` ("" and "." dropped)."""
    return [part for part in path.split("/") if part not in ("", ".")]


@final
@dataclass
class Located:
    """Where a path landed: ``name`` inside the directory ``dir_fd``.

    ``name`` is "" when the path is the directory ``dir_fd`` itself (the
    root, or a path ending in ``..``). ``shown`` is the resolved path as seen
    from inside the container, for messages. The caller owns ``dir_fd``.
    """

    dir_fd: int
    name: str
    shown: str
    #: Directories created on the way (``missing="create"``).
    created: Created | None = None

    def close(self) -> None:
        os.close(self.dir_fd)
        if self.created is not None:
            self.created.close()

    def lstat(self) -> os.stat_result | None:
        """The entry's own metadata, or None when nothing is there."""
        if not self.name:
            return os.fstat(self.dir_fd)
        try:
            return os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def open_dir(self) -> int:
        """A new fd of the entry, which must be a directory."""
        if not self.name:
            return os.dup(self.dir_fd)
        return os.open(self.name, DIR_FLAGS, dir_fd=self.dir_fd)


def check_name(name: str, entry: str) -> None:
    """Refuse ``name`` (one component) when it is reserved for upload staging.

    ``entry`` is what the message names (an archive entry, a path).
    """
    if name.startswith(STAGING_PREFIX):
        raise InvalidArgument(f"{entry} is reserved for upload staging")


def make_dir(dir_fd: int, name: str, mode: int) -> int:
    """Create the directory ``name`` in ``dir_fd`` with exactly ``mode``
    (whatever the umask); return a new fd of it.

    The mode is set through that fd: a chmod by name would follow a symlink
    swapped in meanwhile, possibly to somewhere outside the root.
    """
    os.mkdir(name, 0o700, dir_fd=dir_fd)
    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


@final
@dataclass
class Created:
    """A chain of directories :func:`locate` created: ``names[0]`` inside
    ``dir_fd`` (owned), each next one inside the previous."""

    dir_fd: int
    #: ``dir_fd``'s (atime, mtime) before the first mkdir, to restore on undo.
    times: tuple[int, int]
    names: list[str] = field(default_factory=list)

    def undo(self) -> None:
        """Remove the chain, deepest first, and restore ``dir_fd``'s times."""
        cursor = DirCursor(self.dir_fd)
        try:
            for name in self.names:
                cursor.down(name)
            while cursor.path:
                os.rmdir(cursor.up(), dir_fd=cursor.fd)
        finally:
            cursor.close()
        restore_times(self.dir_fd, self.times)

    def close(self) -> None:
        os.close(self.dir_fd)


def restore_times(fd: int, times: tuple[int, int]) -> None:
    """Put back a directory's (atime, mtime) in ns, when allowed: setting
    times takes ownership (or root), which writing into it does not."""
    try:
        os.utime(fd, ns=times)
    except PermissionError:
        pass


def _join(names: list[str], last: str = "") -> str:
    return "/" + "/".join([*names, last] if last else names)


def locate(
    root_fd: int,
    path: str,
    *,
    follow: bool,
    missing: Literal["error", "create", "stop"] = "error",
) -> Located:
    """Resolve ``path`` inside the directory ``root_fd`` as if it were "/".

    Holds one directory fd whatever the depth (see :class:`DirCursor`).

    Args:
        root_fd: the container root.
        path: absolute or relative; both start at the root.
        follow: expand a symlink in the last component too.
        missing: what a missing intermediate directory does: "error" raises
            NotFound; "create" creates it (mode 0o755) and records it in
            ``Located.created``; "stop" returns it as the located name, so
            ``dir_fd`` is the deepest directory that exists.

    Raises:
        NotFound: an intermediate directory is missing (naming it), or a
            component is not a directory.
        InvalidArgument: too many levels of symlinks.
        OSError: any other filesystem failure.
    """
    # The cursor's path is the directories walked so far; going up is "..",
    # and it starts at the root, so ".." can never leave it.
    cursor = DirCursor(root_fd)
    created: Created | None = None
    todo = components(path)[::-1]
    links = 0
    try:
        while todo:
            part = todo.pop()
            names = cursor.path
            if part == "..":
                if names:
                    cursor.up()
                continue
            if not todo and not follow:
                return _found(cursor, part, _join(names, part), created)
            try:
                st = os.stat(part, dir_fd=cursor.fd, follow_symlinks=False)
            except FileNotFoundError:
                if not todo or missing == "stop":
                    return _found(cursor, part, _join(names, part), created)
                if missing == "error":
                    raise NotFound(f"no such directory: {_join(names, part)}") from None
                if created is None:
                    st = os.fstat(cursor.fd)
                    created = Created(os.dup(cursor.fd), (st.st_atime_ns, st.st_mtime_ns))
                os.close(make_dir(cursor.fd, part, 0o755))
                created.names.append(part)
                cursor.down(part)
                continue
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise InvalidArgument(f"too many levels of symbolic links: {path}")
                target = os.readlink(part, dir_fd=cursor.fd)
                if target.startswith("/"):
                    cursor.close()
                    cursor = DirCursor(root_fd)
                todo.extend(components(target)[::-1])
                continue
            if not todo:
                return _found(cursor, part, _join(names, part), created)
            if not stat.S_ISDIR(st.st_mode):
                raise NotFound(f"not a directory: {_join(names, part)}")
            try:
                cursor.down(part)
            except OSError as err:
                if err.errno == errno.ELOOP:  # became a symlink since the stat
                    raise NotFound(f"changed during lookup: {_join(names, part)}") from err
                raise
        return _found(cursor, "", _join(cursor.path), created)
    except BaseException:
        cursor.close()
        if created is not None:
            try:
                created.undo()
            finally:
                created.close()
        raise


def _found(cursor: DirCursor, name: str, shown: str, created: Created | None) -> Located:
    # The cursor's fd becomes the Located's; the cursor is not used again.
    return Located(cursor.fd, name, shown, created)


def locked_staging(host_fd: int) -> tuple[int, str]:
    """Create a staging directory in ``host_fd``; return its fd, locked, and name.

    The lock (flock, released when the fd closes, so also by a crash) tells
    a sweep the directory is alive. A sweep can take a directory in the
    moment between its mkdir and its lock; it removes it holding the lock,
    so the creator, once it gets the lock, sees it gone and starts again.
    """
    while True:
        name = STAGING_PREFIX + secrets.token_hex(8)
        try:
            os.mkdir(name, 0o700, dir_fd=host_fd)
        except FileExistsError:
            continue
        fd = os.open(name, DIR_FLAGS, dir_fd=host_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:
                return fd, name
        except BaseException:
            os.close(fd)
            remove_tree(host_fd, name)
            raise
        os.close(fd)


def mount_of(fd: int) -> int:
    """An id of the mount ``fd`` is on: rename works only within one mount
    (a bind mount of the same filesystem included), so st_dev is not enough."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            for line in info:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1 - os.fstat(fd).st_dev  # no /proc: the filesystem, as a fallback

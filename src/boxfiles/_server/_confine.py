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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, final

from .._errors import InvalidArgument, NotFound

#: Flags for opening a directory during a walk; O_NOFOLLOW makes a component
#: swapped for a symlink after it was checked fail instead of being followed.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

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


def remove_tree(dir_fd: int, name: str) -> None:
    """Remove ``name`` inside ``dir_fd`` and everything under it, never
    following a symlink, holding one fd whatever the depth (shutil.rmtree
    takes dir_fd only from Python 3.11, and recurses)."""
    walk = TreeWalk(dir_fd, names=[name])
    try:
        # An archive may have made a directory read-only; its owner may
        # still chmod it.
        for child, child_st, leaving in walk:
            if leaving:
                os.rmdir(child, dir_fd=walk.fd)
            elif stat.S_ISDIR(child_st.st_mode):
                os.fchmod(walk.descend(child), 0o700)
            else:
                os.unlink(child, dir_fd=walk.fd)
    finally:
        walk.close()


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

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
import os
import stat
from dataclasses import dataclass
from typing import final

from ._errors import InvalidArgument, NotFound

#: Flags for opening a directory during a walk; O_NOFOLLOW makes a component
#: swapped for a symlink after it was checked fail instead of being followed.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: Symlinks expanded in one walk before giving up, as Linux's MAXSYMLINKS.
MAX_LINKS = 40


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

    def close(self) -> None:
        os.close(self.dir_fd)

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


def _join(names: list[str], last: str = "") -> str:
    return "/" + "/".join([*names, last] if last else names)


def locate(
    root_fd: int,
    path: str,
    *,
    follow: bool,
    created: list[tuple[int, str]] | None = None,
) -> Located:
    """Resolve ``path`` inside the directory ``root_fd`` as if it were "/".

    Args:
        root_fd: the container root.
        path: absolute or relative; both start at the root.
        follow: expand a symlink in the last component too.
        created: when given, missing intermediate directories are created
            (mode 0o755) and each is appended as ``(dup of parent fd, name)``
            so the caller can remove them again; when None they are NotFound.

    Raises:
        NotFound: an intermediate directory is missing (naming it), or a
            component is not a directory.
        InvalidArgument: too many levels of symlinks.
        OSError: any other filesystem failure.
    """
    # The stack holds the directories walked so far; popping it is "..",
    # and its bottom is the root, so ".." can never leave it.
    fds = [os.dup(root_fd)]
    names: list[str] = []
    todo = components(path)[::-1]
    links = 0
    try:
        while todo:
            part = todo.pop()
            if part == "..":
                if len(fds) > 1:
                    os.close(fds.pop())
                    names.pop()
                continue
            here = fds[-1]
            if not todo and not follow:
                return Located(fds.pop(), part, _join(names, part))
            try:
                st = os.stat(part, dir_fd=here, follow_symlinks=False)
            except FileNotFoundError:
                if not todo:
                    return Located(fds.pop(), part, _join(names, part))
                if created is None:
                    raise NotFound(f"no such directory: {_join(names, part)}") from None
                fds.append(make_dir(here, part, 0o755))
                created.append((os.dup(here), part))
                names.append(part)
                continue
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise InvalidArgument(f"too many levels of symbolic links: {path}")
                target = os.readlink(part, dir_fd=here)
                if target.startswith("/"):
                    while len(fds) > 1:
                        os.close(fds.pop())
                    names.clear()
                todo.extend(components(target)[::-1])
                continue
            if not todo:
                return Located(fds.pop(), part, _join(names, part))
            if not stat.S_ISDIR(st.st_mode):
                raise NotFound(f"not a directory: {_join(names, part)}")
            try:
                fds.append(os.open(part, DIR_FLAGS, dir_fd=here))
            except OSError as err:
                if err.errno == errno.ELOOP:  # became a symlink since the stat
                    raise NotFound(f"changed during lookup: {_join(names, part)}") from err
                raise
            names.append(part)
        return Located(fds.pop(), "", _join(names))
    finally:
        for fd in fds:
            os.close(fd)


def remove_tree(dir_fd: int, name: str) -> None:
    """Remove ``name`` inside ``dir_fd`` and everything under it, never
    following a symlink (shutil.rmtree takes dir_fd only from Python 3.11)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    try:
        # An archive may have made it read-only; its owner may still chmod it.
        os.fchmod(fd, 0o700)
        for child in os.listdir(fd):
            remove_tree(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)

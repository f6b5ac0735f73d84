"""Upload staging: a hidden, flock-held directory on the destination's own
filesystem, where an upload is extracted before it is placed; and the sweep
that removes a dead server's staging at start."""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import final

from .._errors import (
    RemoteError,
)
from .._fs import DIR_FLAGS, TreeWalk, remove_tree
from ._confine import (
    STAGING_PREFIX,
    locate,
    locked_staging,
    make_dir,
    restore_times,
)
from ._extract import Placement, Staged

log = logging.getLogger("boxfiles.server")


@final
@dataclass
class Staging:
    """An upload's hidden directory, with ``tree`` (what is extracted) in it.

    It is made on the destination's own filesystem, so placing is a rename
    even into a volume mounted inside the root: in the destination when that
    is an existing directory, else in the deepest existing directory on the
    way to it. Owns its fds. Its host directory's times are put back when it
    is removed, unless something else (placement, another upload) changed
    that directory meanwhile.
    """

    root_fd: int
    host_fd: int
    #: The host's (atime, mtime) before the staging was made, and its mtime
    #: just after.
    host_times: tuple[int, int]
    host_made_ns: int
    fd: int
    name: str
    tree_fd: int

    @classmethod
    def create(cls, root: Path, dest_path: str) -> Staging:
        root_fd = os.open(root, DIR_FLAGS)
        try:
            host_fd = _staging_host(root_fd, dest_path)
            try:
                host = os.fstat(host_fd)
                fd, name = locked_staging(host_fd)
                made_ns = os.fstat(host_fd).st_mtime_ns
                try:
                    # Mode of a directory archive without a "./" entry: the
                    # staged tree may become the destination itself.
                    tree_fd = make_dir(fd, "tree", 0o755)
                except BaseException:
                    remove_tree(host_fd, name)
                    os.close(fd)
                    raise
            except BaseException:
                os.close(host_fd)
                raise
        except BaseException:
            os.close(root_fd)
            raise
        times = (host.st_atime_ns, host.st_mtime_ns)
        return cls(root_fd, host_fd, times, made_ns, fd, name, tree_fd)

    def place(
        self,
        staged: Staged,
        dest_path: str,
        *,
        file_mode: bool,
        mkdir_parents: bool,
        overwrite: bool,
    ) -> None:
        placement = Placement(self.root_fd, self.fd, overwrite=overwrite)
        try:
            placement.run(staged, dest_path, file_mode=file_mode, mkdir_parents=mkdir_parents)
        finally:
            placement.close()

    def remove(self) -> None:
        os.close(self.tree_fd)
        try:
            untouched = os.fstat(self.host_fd).st_mtime_ns == self.host_made_ns
            remove_tree(self.host_fd, self.name)  # still locked: no sweep races it
            if untouched:
                restore_times(self.host_fd, self.host_times)
        finally:
            os.close(self.fd)
            os.close(self.host_fd)
            os.close(self.root_fd)


def _staging_host(root_fd: int, dest_path: str) -> int:
    """A new fd of the directory an upload to ``dest_path`` stages in."""
    try:
        dest = locate(root_fd, dest_path, follow=True, missing="stop")
    except RemoteError:
        # Placement will refuse this destination, once the upload is read
        # (see SPEC); until then, stage at the root.
        return os.dup(root_fd)
    try:
        st = dest.lstat()
        if st is not None and stat.S_ISDIR(st.st_mode):
            return dest.open_dir()
        return os.dup(dest.dir_fd)
    finally:
        dest.close()


#: Filesystem types a sweep does not walk into: kernel views, not storage an
#: upload could have staged in (a container root may have them mounted).
_PSEUDO_FS = frozenset(
    "proc sysfs cgroup cgroup2 devpts mqueue debugfs tracefs securityfs pstore bpf "
    "fusectl configfs binfmt_misc autofs hugetlbfs devtmpfs nsfs efivarfs".split()
)


def _pseudo_devices() -> set[int]:
    """st_dev of every mounted pseudo filesystem (from /proc/self/mountinfo)."""
    found = set()
    try:
        with open("/proc/self/mountinfo") as mounts:
            for line in mounts:
                fields = line.split()
                fstype = fields[fields.index("-") + 1]
                if fstype in _PSEUDO_FS:
                    major, minor = fields[2].split(":")
                    found.add(os.makedev(int(major), int(minor)))
    except OSError:
        pass  # no /proc: nothing to skip
    return found


def sweep_stale_staging(root: Path) -> list[str]:
    """Remove staging left in ``root`` by a server that died mid-upload.

    Staging can be made anywhere in the tree, so the whole tree is walked
    (without recursion, never following a symlink, skipping kernel pseudo
    filesystems). Staging whose lock is held belongs to a live upload (of
    this or another server on the same root) and is kept; any other is a
    dead server's, whatever its age. Returns the paths removed.
    """
    removed = []
    skip = _pseudo_devices()
    root_fd = os.open(root, DIR_FLAGS)
    try:
        walk = TreeWalk(root_fd)
    finally:
        os.close(root_fd)
    try:
        for name, st, leaving in walk:
            if leaving or not stat.S_ISDIR(st.st_mode):
                continue
            if not name.startswith(STAGING_PREFIX):
                if st.st_dev not in skip:
                    try:
                        walk.descend(name)
                    except OSError:
                        pass  # unreadable: nothing of ours can be in it
                continue
            path = "/".join([*walk.path, name])
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=walk.fd)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                remove_tree(walk.fd, name)  # holding the lock: see locked_staging
            except BlockingIOError:
                continue  # in use
            except Exception as err:  # a server must start even beside debris it cannot remove
                log.warning("could not remove stale staging %s: %r", path, err)
                continue
            finally:
                os.close(fd)
            removed.append(path)
    finally:
        walk.close()
    return removed

"""Upload, server side: extract a tar stream into staging, then move it into place.

Both steps are blocking and run in worker threads. Extraction only ever
creates entries inside a fresh staging directory and refuses every entry that
could reach outside it; placement moves the staged tree to its destination
with a journal, so a failure part way undoes what was done and the tree under
the root is left as it was.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import final

from ._confine import DIR_FLAGS, Located, components, locate, make_dir
from ._errors import AlreadyExists, FailedPrecondition, InvalidArgument
from ._paxtime import mtime_ns
from ._tarstream import ChunkStream, next_member, open_archive, write_member

#: Permission bits kept from an archive: setuid and setgid are dropped, as an
#: upload must not mint set-id executables owned by the server's user.
MODE_MASK = 0o1777


@final
@dataclass
class Staged:
    """What extraction left in the staging tree."""

    #: Names of the tree's top-level entries.
    top: list[str] = field(default_factory=list)
    #: How many entries the archive held (the root "./" entry not counted).
    entries: int = 0
    #: True when the archive's only entry is a single non-directory.
    single_file: bool = False
    #: The archive has a "./" entry: it is a directory's contents.
    root_entry: bool = False


#: Deepest entry accepted: staging is walked and removed one directory (and
#: one open descriptor) per level, so depth must stay well inside both the
#: recursion and the file-descriptor limits.
MAX_DEPTH = 256


def _entry_parts(name: str, what: str = "entry") -> list[str]:
    if name.startswith("/"):
        raise InvalidArgument(f"archive {what} has an absolute name: {name}")
    parts = components(name)
    if ".." in parts:
        raise InvalidArgument(f"archive {what} contains ..: {name}")
    if len(parts) > MAX_DEPTH:
        raise InvalidArgument(f"archive {what} is nested deeper than {MAX_DEPTH}: {name[:64]}...")
    return parts


@final
class _Tree:
    """The staging tree, walked without ever following a symlink."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._cached: tuple[tuple[str, ...], int] | None = None

    def parent(self, parts: list[str], entry: str, *, create: bool, missing: str = "") -> int:
        """An fd of the directory holding ``parts[-1]`` (owned by the tree).

        Missing directories are created, or refused with ``missing`` as the
        message.
        """
        key = tuple(parts[:-1])
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        fd = os.dup(self.fd)
        try:
            for i, part in enumerate(key):
                try:
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    if not create:
                        raise InvalidArgument(missing) from None
                    # A parent the archive does not list: as tar does.
                    child = make_dir(fd, part, 0o755)
                    os.close(fd)
                    fd = child
                    continue
                if stat.S_ISLNK(st.st_mode):
                    raise InvalidArgument(
                        f"archive entry {entry} goes through the symlink {'/'.join(key[: i + 1])}"
                    )
                if not stat.S_ISDIR(st.st_mode):
                    raise InvalidArgument(
                        f"archive entry {entry}: {'/'.join(key[: i + 1])} is not a directory"
                    )
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        self.forget()
        self._cached = (key, fd)
        return fd

    def forget(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def clear(self, dir_fd: int, name: str, entry: str) -> None:
        """Make room for a non-directory entry (a later entry replaces an earlier one)."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"archive entry {entry} would replace a directory")
        os.unlink(name, dir_fd=dir_fd)


def extract(stream: ChunkStream, tree_fd: int) -> Staged:
    """Extract the tar archive read from ``stream`` into the empty directory ``tree_fd``.

    Reads ``stream`` to its end, so a caller feeding it sees every byte taken.

    Raises:
        InvalidArgument: the archive is truncated or corrupt, or an entry is
            hostile (absolute or ``..`` name, a path through a symlink, a hard
            link to anything not already extracted, a device node or fifo).
            The message names the entry.
        OSError: writing the staging tree failed.
    """
    staged = Staged()
    tree = _Tree(tree_fd)
    dirs: list[tuple[list[str], int, int]] = []
    current = "(first header)"
    try:
        tar = open_archive(stream)
    except tarfile.ReadError as err:
        raise InvalidArgument(f"not a tar archive: {err}") from err
    except (ValueError, OverflowError) as err:  # absurd numbers in the first header
        raise InvalidArgument(f"corrupt archive: {err}") from err
    try:
        with tar:
            while True:
                member = next_member(tar)
                if member is None:
                    break
                current = member.name
                _extract_member(member, stream, tree, dirs, staged)
                current = f"(header after {member.name})"
    # ValueError, OverflowError: absurd numbers in a header (a NaN or far-off
    # mtime, a negative size).
    except (tarfile.TarError, EOFError, ValueError, OverflowError) as err:
        raise InvalidArgument(f"truncated or corrupt archive at entry {current}: {err}") from err
    finally:
        tree.forget()
    # Directories last and deepest first, so adding their entries did not
    # disturb the mtimes and read-only modes do not block extraction.
    # Through an fd: a name could have been swapped for a symlink.
    for parts, mode, mtime in sorted(dirs, key=lambda d: -len(d[0])):
        if parts:
            parent = tree.parent(parts, "/".join(parts), create=False)
            fd = os.open(parts[-1], DIR_FLAGS, dir_fd=parent)
        else:
            fd = os.dup(tree_fd)
        try:
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime, mtime))
        except OverflowError as err:
            raise InvalidArgument(
                f"archive entry {'/'.join(parts) or '.'} has an absurd mtime"
            ) from err
        finally:
            os.close(fd)
    tree.forget()
    staged.top = sorted(os.listdir(tree_fd))
    return staged


def _extract_member(
    member: tarfile.TarInfo,
    stream: ChunkStream,
    tree: _Tree,
    dirs: list[tuple[list[str], int, int]],
    staged: Staged,
) -> None:
    name = member.name
    parts = _entry_parts(name)
    mode = member.mode & MODE_MASK
    mtime = mtime_ns(member)
    if not parts:
        if not member.isdir():
            raise InvalidArgument(
                f"archive entry {name} names the destination but is not a directory"
            )
        dirs.append(([], mode, mtime))
        staged.root_entry = True
        staged.single_file = False
        return
    staged.entries += 1
    staged.single_file = (
        staged.entries == 1 and not staged.root_entry and not member.isdir() and len(parts) == 1
    )
    if member.ischr() or member.isblk() or member.isfifo():
        raise InvalidArgument(f"archive entry {name}: device nodes and fifos are not accepted")
    parent = tree.parent(parts, name, create=True)
    last = parts[-1]
    if member.isdir():
        try:
            st = os.stat(last, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(last, dir_fd=parent)
            st = None
        if st is None:
            os.mkdir(last, 0o700, dir_fd=parent)
        dirs.append((parts, mode, mtime))
    elif member.isreg():
        tree.clear(parent, last, name)
        fd = os.open(
            last,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=parent,
        )
        try:
            write_member(member, stream, fd)
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)
    elif member.issym():
        tree.clear(parent, last, name)
        # Stored verbatim: a symlink is only ever followed by a later walk,
        # and every walk resolves it inside the root.
        os.symlink(member.linkname, last, dir_fd=parent)
        os.utime(last, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)
    elif member.islnk():
        target = _entry_parts(member.linkname, f"hard link {name} ->")
        if not target:
            raise InvalidArgument(f"archive entry {name} is a hard link to a directory")
        absent = (
            f"archive entry {name} is a hard link to {member.linkname}, which is not in the archive"
        )
        source = os.dup(tree.parent(target, name, create=False, missing=absent))
        try:
            try:
                st = os.stat(target[-1], dir_fd=source, follow_symlinks=False)
            except FileNotFoundError:
                raise InvalidArgument(absent) from None
            if stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(f"archive entry {name} is a hard link to a directory")
            parent = tree.parent(parts, name, create=True)
            tree.clear(parent, last, name)
            os.link(target[-1], last, src_dir_fd=source, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(source)
    else:
        raise InvalidArgument(f"archive entry {name} has an unsupported type {member.type!r}")


@final
class Journal:
    """Undo steps for placement, run in reverse when placement fails."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def did(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def roll_back(self) -> None:
        errors: list[OSError] = []
        for undo in reversed(self._undo):
            try:
                undo()
            except OSError as err:  # keep undoing the rest
                errors.append(err)
        self._undo.clear()
        if errors:
            raise errors[0]


@final
class Placement:
    """Moves a staged tree into the container root, undoably.

    ``root_fd`` is the container root; ``staging_fd`` holds ``tree`` (the
    staged entries) and receives whatever is replaced (under ``trash``), so
    replaced entries can be put back and are removed with the staging.
    """

    def __init__(self, root_fd: int, staging_fd: int, *, overwrite: bool) -> None:
        self._root_fd = root_fd
        self._staging_fd = staging_fd
        self._overwrite = overwrite
        self._journal = Journal()
        self._fds: list[int] = []
        self._trashed = 0
        os.mkdir("trash", 0o700, dir_fd=staging_fd)
        self._trash_fd = self._keep(os.open("trash", DIR_FLAGS, dir_fd=staging_fd))

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def run(self, staged: Staged, dest_path: str, *, file_mode: bool, mkdir_parents: bool) -> None:
        """Put the staged tree at ``dest_path``; on any error undo and re-raise."""
        created: list[tuple[int, str]] = []
        try:
            dest = locate(
                self._root_fd, dest_path, follow=True, created=created if mkdir_parents else None
            )
        except BaseException:
            self._undo_created(created)
            raise
        self._keep(dest.dir_fd)
        for fd, name in created:
            self._keep(fd)
            self._journal.did(lambda fd=fd, name=name: os.rmdir(name, dir_fd=fd))  # type: ignore[misc]
        tree_fd = self._keep(os.open("tree", DIR_FLAGS, dir_fd=self._staging_fd))
        try:
            if file_mode:
                self._place_file(tree_fd, staged.top[0], dest)
            else:
                self._place_dir(tree_fd, dest)
        except BaseException:
            self._journal.roll_back()
            raise

    def _undo_created(self, created: list[tuple[int, str]]) -> None:
        for fd, name in reversed(created):
            try:
                os.rmdir(name, dir_fd=fd)
            finally:
                os.close(fd)

    def _move(self, src_fd: int, src: str, dst_fd: int, dst: str) -> None:
        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        self._journal.did(lambda: os.rename(dst, src, src_dir_fd=dst_fd, dst_dir_fd=src_fd))

    def _replace(
        self, src_fd: int, src: str, dst_fd: int, dst: str, shown: str, is_dir: bool
    ) -> None:
        if not self._overwrite:
            raise AlreadyExists(f"already exists: {shown}")
        if is_dir:
            raise FailedPrecondition(f"cannot replace the directory {shown} with a non-directory")
        self._trashed += 1
        spare = str(self._trashed)
        if not stat.S_ISDIR(os.stat(src, dir_fd=src_fd, follow_symlinks=False).st_mode):
            # Keep the old entry by a hard link, then rename over it: readers
            # see the old or the new entry, never neither.
            try:
                os.link(
                    dst, spare, src_dir_fd=dst_fd, dst_dir_fd=self._trash_fd, follow_symlinks=False
                )
            except OSError:
                pass  # e.g. fs.protected_hardlinks: fall back to two renames
            else:
                os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
                self._journal.did(
                    lambda: os.rename(spare, dst, src_dir_fd=self._trash_fd, dst_dir_fd=dst_fd)
                )
                return
        self._move(dst_fd, dst, self._trash_fd, spare)
        self._move(src_fd, src, dst_fd, dst)

    def _place_file(self, tree_fd: int, entry: str, dest: Located) -> None:
        st = dest.lstat()
        if st is not None and stat.S_ISDIR(st.st_mode):
            into = self._keep(dest.open_dir())
            self._put(tree_fd, entry, into, entry, f"{dest.shown.rstrip('/')}/{entry}")
            return
        self._put(tree_fd, entry, dest.dir_fd, dest.name, dest.shown)

    def _put(self, src_fd: int, src: str, dst_fd: int, dst: str, shown: str) -> None:
        try:
            st = os.stat(dst, dir_fd=dst_fd, follow_symlinks=False)
        except FileNotFoundError:
            self._move(src_fd, src, dst_fd, dst)
            return
        self._replace(src_fd, src, dst_fd, dst, shown, stat.S_ISDIR(st.st_mode))

    def _place_dir(self, tree_fd: int, dest: Located) -> None:
        st = dest.lstat()
        if st is None:
            self._move(self._staging_fd, "tree", dest.dir_fd, dest.name)
        elif stat.S_ISDIR(st.st_mode):
            self._merge(tree_fd, self._keep(dest.open_dir()), dest.shown.rstrip("/"))
        else:
            self._replace(self._staging_fd, "tree", dest.dir_fd, dest.name, dest.shown, False)

    def _merge(self, src_fd: int, dst_fd: int, shown: str) -> None:
        for name in sorted(os.listdir(src_fd)):
            here = f"{shown}/{name}"
            src_st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
            try:
                dst_st = os.stat(name, dir_fd=dst_fd, follow_symlinks=False)
            except FileNotFoundError:
                self._move(src_fd, name, dst_fd, name)
                continue
            if stat.S_ISDIR(src_st.st_mode) and stat.S_ISDIR(dst_st.st_mode):
                self._merge(
                    self._keep(os.open(name, DIR_FLAGS, dir_fd=src_fd)),
                    self._keep(os.open(name, DIR_FLAGS, dir_fd=dst_fd)),
                    here,
                )
                continue
            self._replace(src_fd, name, dst_fd, name, here, stat.S_ISDIR(dst_st.st_mode))

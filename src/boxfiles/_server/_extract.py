"""Upload, server side: extract a tar stream into staging, then move it into place.

Both steps are blocking and run in worker threads. Extraction only ever
creates entries inside a fresh staging directory and refuses every entry that
could reach outside it; placement moves the staged tree to its destination
with a journal, so a failure part way undoes what was done and the tree under
the root is left as it was.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from dataclasses import dataclass, field
from typing import final

from .._errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted
from .._fs import DIR_FLAGS, DirCursor, Journal, TreeWalk, remove_tree
from .._tar._paxtime import mtime_ns
from .._tar._read import ChunkStream, next_member, open_archive, write_member
from .._tar._rules import MAX_ARCHIVE_ENTRIES, MODE_MASK, BadEntry, entry_parts
from ._confine import (
    Located,
    check_name,
    components,
    locate,
    locked_staging,
    make_dir,
    mount_of,
    restore_times,
)

#: Bytes copied per call when a staged file must cross to another mount.
_COPY_STEP = 8 * 1024 * 1024

#: Bits a staged directory has until placement is done: its owner must be
#: able to move it and the entries in it, even when not root.
_OWNER_RWX = 0o700


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
    #: Directories (path in the tree, mode) whose mode denies their owner
    #: something: staged as ``mode | 0o700`` and given ``mode`` only once
    #: everything is in place, deepest first.
    restricted: list[tuple[list[str], int]] = field(default_factory=list)


def _entry_parts(name: str, what: str = "entry") -> list[str]:
    """The shared entry rules, plus the server's own: staging names are
    reserved (a client extracting locally has no such names to protect)."""
    try:
        parts = entry_parts(name, what)
    except BadEntry as err:
        raise InvalidArgument(str(err)) from None
    for part in parts:
        check_name(part, f"archive {what} {name}")
    return parts


@final
class _Tree:
    """The staging tree, walked without ever following a symlink.

    One cursor moves from entry to entry: an archive lists a directory's
    entries together, so finding each entry's parent costs a step or two,
    not its depth, and holds one fd.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._cursor: DirCursor | None = None

    def parent(self, parts: list[str], entry: str, *, create: bool, missing: str = "") -> int:
        """An fd of the directory holding ``parts[-1]`` (owned by the tree,
        valid until the next call).

        Missing directories are created, or refused with ``missing`` as the
        message.
        """
        if self._cursor is None:
            self._cursor = DirCursor(self.fd)
        cursor = self._cursor
        key = parts[:-1]
        while cursor.path != key[: len(cursor.path)]:
            cursor.up()
        while len(cursor.path) < len(key):
            part = key[len(cursor.path)]
            here = "/".join(key[: len(cursor.path) + 1])
            try:
                cursor.down(part)
            except FileNotFoundError:
                if not create:
                    raise InvalidArgument(missing) from None
                # A parent the archive does not list: as tar does.
                os.close(make_dir(cursor.fd, part, 0o755))
                cursor.down(part)
            except OSError as err:
                if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                # O_NOFOLLOW | O_DIRECTORY met a symlink or a non-directory.
                if stat.S_ISLNK(os.stat(part, dir_fd=cursor.fd, follow_symlinks=False).st_mode):
                    raise InvalidArgument(
                        f"archive entry {entry} goes through the symlink {here}"
                    ) from err
                raise InvalidArgument(f"archive entry {entry}: {here} is not a directory") from err
        return cursor.fd

    def forget(self) -> None:
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None

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
    # disturb the mtimes. Modes that would lock their owner out wait for
    # placement (see Staged.restricted). Through an fd: a name could have
    # been swapped for a symlink.
    for parts, mode, mtime in sorted(dirs, key=lambda d: -len(d[0])):
        if parts:
            parent = tree.parent(parts, "/".join(parts), create=False)
            fd = os.open(parts[-1], DIR_FLAGS, dir_fd=parent)
        else:
            fd = os.dup(tree_fd)
        if mode & _OWNER_RWX != _OWNER_RWX:
            staged.restricted.append((parts, mode))
        try:
            os.fchmod(fd, mode | _OWNER_RWX)
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
    if staged.entries > MAX_ARCHIVE_ENTRIES:
        raise ResourceExhausted(
            f"the archive holds more than {MAX_ARCHIVE_ENTRIES} entries, the most this server takes"
        )
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
        for part in components(member.linkname):
            check_name(part, f"archive entry {name} (a link to {member.linkname})")
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


#: Where a placed directory is: ``path`` (names) below the directory ``base``.
_Where = tuple[int, list[str]]


@final
class Placement:
    """Moves a staged tree into the container root, undoably.

    ``root_fd`` is the container root; ``staging_fd`` holds ``tree`` (the
    staged entries) and receives whatever is replaced (under ``trash``), so
    replaced entries can be put back and are removed with the staging.

    Placement rules (as ``docker cp``): a non-directory replaces a
    non-directory only with ``overwrite``; a directory merges into a
    directory; a directory never replaces a non-directory nor the reverse,
    whatever ``overwrite`` (FAILED_PRECONDITION naming the path), at the
    destination and at every level of a merge. A symlink in the tree counts
    as a non-directory: it is not followed by a merge.

    Every walk holds one fd per tree, whatever the depth; undo steps record
    where (a base fd and names below it), not an fd per level. A rolled-back
    placement restores the times of every directory it changed.
    """

    def __init__(self, root_fd: int, staging_fd: int, *, overwrite: bool) -> None:
        self._root_fd = root_fd
        self._staging_fd = staging_fd
        self._overwrite = overwrite
        self._journal = Journal()
        self._fds: list[int] = []
        self._cursors: dict[int, DirCursor] = {}
        self._trashed = 0
        self._dest: Located | None = None
        #: (st_dev, st_ino) of every directory whose entries placement changed.
        self._touched: set[tuple[int, int]] = set()
        #: Staged directories moved as a whole: their path in the tree, and
        #: where they went.
        self._moved: dict[tuple[str, ...], _Where] = {}
        os.mkdir("trash", 0o700, dir_fd=staging_fd)
        self._trash_fd = self._keep(os.open("trash", DIR_FLAGS, dir_fd=staging_fd))
        #: Trash per mount (see _trash), and the staging made on other mounts.
        self._trashes = {mount_of(staging_fd): self._trash_fd}
        self._foreign: list[tuple[_Where, str]] = []
        self._take_out_step = self._take_out
        self._put_back_step = self._put_back

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        try:
            for where, name in self._foreign:  # what they hold is replaced content
                remove_tree(self._at(where), name)
        finally:
            self._close()

    def _close(self) -> None:
        for cursor in self._cursors.values():
            cursor.close()
        self._cursors.clear()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if self._dest is not None:
            self._dest.close()
            self._dest = None

    def run(self, staged: Staged, dest_path: str, *, file_mode: bool, mkdir_parents: bool) -> None:
        """Put the staged tree at ``dest_path``; on any error undo and re-raise."""
        dest = self._dest = locate(
            self._root_fd, dest_path, follow=True, missing="create" if mkdir_parents else "error"
        )
        try:
            if dest.created is not None:
                self._journal.did(dest.created.undo)
            tree_fd = self._keep(os.open("tree", DIR_FLAGS, dir_fd=self._staging_fd))
            if file_mode:
                self._place_file(tree_fd, staged.top[0], dest)
            else:
                self._place_dir(tree_fd, dest)
            self._restrict(staged.restricted)
        except BaseException:
            self._journal.roll_back()
            raise

    def _at(self, where: _Where) -> int:
        """An fd of the directory ``where`` (owned by the placement)."""
        base, path = where
        cursor = self._cursors.get(base)
        if cursor is None:
            cursor = self._cursors[base] = DirCursor(base)
        return cursor.go(path)

    def _touch(self, where: _Where, fd: int) -> None:
        """Note that the directory ``fd`` (at ``where``) is about to change."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in self._touched:
            return
        self._touched.add(key)
        times = (st.st_atime_ns, st.st_mtime_ns)
        self._journal.did(self._restore_times, where, times)

    # Undo steps are journalled as a method and its arguments (see
    # Journal); a merge shares one ``where`` among a directory's entries,
    # and the steps taken per entry use bound methods made once, in
    # __init__, rather than one per step.

    def _restore_times(self, where: _Where, times: tuple[int, int]) -> None:
        restore_times(self._at(where), times)

    def _spare(self) -> str:
        self._trashed += 1
        return str(self._trashed)

    def _trash(self, where: _Where, dst_fd: int) -> int:
        """The trash on the mount of the directory ``dst_fd`` (at ``where``):
        the staging's, or one made there the first time a destination lies
        on another mount (a volume inside the root), so every placing step
        is still a rename within one mount."""
        mount = mount_of(dst_fd)
        trash = self._trashes.get(mount)
        if trash is None:
            self._touch(where, dst_fd)
            trash, name = locked_staging(dst_fd)
            self._trashes[mount] = self._keep(trash)
            self._foreign.append((where, name))
            self._journal.did(self._remove_tree, where, name)
        return trash

    def _remove_tree(self, where: _Where, name: str) -> None:
        remove_tree(self._at(where), name)

    def _near(self, src_fd: int, src: str, where: _Where, dst_fd: int) -> tuple[int, str, int]:
        """``src`` as a directory fd and name on the destination's mount
        (copied there when it is not), and that mount's trash."""
        trash = self._trash(where, dst_fd)
        if trash == self._trash_fd:
            return src_fd, src, trash
        copy = self._spare()
        _copy_tree(src_fd, src, trash, copy)
        return trash, copy, trash

    def _add(self, src_fd: int, src: str, where: _Where, dst_fd: int, dst: str) -> None:
        """Move the new entry ``src`` to ``dst``, where nothing is."""
        self._touch(where, dst_fd)
        src_fd, src, trash = self._near(src_fd, src, where, dst_fd)
        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        self._journal.did(self._take_out_step, where, dst, trash)

    def _take_out(self, where: _Where, name: str, trash: int) -> None:
        os.rename(name, self._spare(), src_dir_fd=self._at(where), dst_dir_fd=trash)

    def _put_back(self, where: _Where, name: str, spare: int, trash: int) -> None:
        os.rename(str(spare), name, src_dir_fd=trash, dst_dir_fd=self._at(where))

    def _replace(
        self, src_fd: int, src: str, where: _Where, dst_fd: int, dst: str, shown: str
    ) -> None:
        """Put the non-directory ``src`` in place of the non-directory ``dst``."""
        if not self._overwrite:
            raise AlreadyExists(f"already exists: {shown}")
        self._touch(where, dst_fd)
        src_fd, src, trash = self._near(src_fd, src, where, dst_fd)
        spare = self._spare()
        number = self._trashed  # journalled: an int is smaller than its name
        try:
            # Keep the old entry by a hard link, then rename over it: readers
            # see the old or the new entry, never neither.
            os.link(dst, spare, src_dir_fd=dst_fd, dst_dir_fd=trash, follow_symlinks=False)
        except OSError:  # e.g. fs.protected_hardlinks: fall back to two renames
            os.rename(dst, spare, src_dir_fd=dst_fd, dst_dir_fd=trash)
            self._journal.did(self._put_back_step, where, dst, number, trash)
            self._add(src_fd, src, where, dst_fd, dst)
            return
        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        self._journal.did(self._put_back_step, where, dst, number, trash)

    def _put(
        self,
        src_fd: int,
        src: str,
        src_is_dir: bool,
        where: _Where,
        dst_fd: int,
        dst: str,
        shown: str,
    ) -> bool:
        """Place ``src`` at ``dst``; True when both are directories (to merge)."""
        try:
            st = os.stat(dst, dir_fd=dst_fd, follow_symlinks=False)
        except FileNotFoundError:
            self._add(src_fd, src, where, dst_fd, dst)
            return False
        dst_is_dir = stat.S_ISDIR(st.st_mode)
        if src_is_dir and dst_is_dir:
            return True
        if src_is_dir:
            raise FailedPrecondition(f"cannot replace the non-directory {shown} with a directory")
        if dst_is_dir:
            raise FailedPrecondition(f"cannot replace the directory {shown} with a non-directory")
        self._replace(src_fd, src, where, dst_fd, dst, shown)
        return False

    def _place_file(self, tree_fd: int, entry: str, dest: Located) -> None:
        st = dest.lstat()
        if st is not None and stat.S_ISDIR(st.st_mode):
            into = self._keep(dest.open_dir())
            self._put(
                tree_fd, entry, False, (into, []), into, entry, f"{dest.shown.rstrip('/')}/{entry}"
            )
            return
        self._put(tree_fd, entry, False, (dest.dir_fd, []), dest.dir_fd, dest.name, dest.shown)

    def _place_dir(self, tree_fd: int, dest: Located) -> None:
        if not dest.name:  # the root itself
            self._merge(tree_fd, dest.dir_fd, dest.shown.rstrip("/"))
            return
        where: _Where = (dest.dir_fd, [])
        if self._put(self._staging_fd, "tree", True, where, dest.dir_fd, dest.name, dest.shown):
            self._merge(tree_fd, self._keep(dest.open_dir()), dest.shown.rstrip("/"))
        else:
            self._moved[()] = (dest.dir_fd, [dest.name])

    def _merge(self, tree_fd: int, dst_fd: int, shown: str) -> None:
        walk = TreeWalk(tree_fd, ordered=True)
        dst = DirCursor(dst_fd)
        where: _Where | None = None  # the current directory's, shared by its entries
        try:
            for name, st, leaving in walk:
                if leaving:
                    dst.up()
                    where = None
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                here = "/".join([shown, *dst.path, name])
                if where is None:
                    where = (dst_fd, list(dst.path))
                if self._put(walk.fd, name, is_dir, where, dst.fd, name, here):
                    walk.descend(name)
                    dst.down(name)
                    where = None
                elif is_dir:
                    staged = [*walk.path, name]
                    self._moved[tuple(staged)] = (dst_fd, [*dst.path, name])
        finally:
            walk.close()
            dst.close()

    def _restrict(self, restricted: list[tuple[list[str], int]]) -> None:
        """Give placed directories the modes that would have locked their
        owner out of placing their content (deepest first, as listed)."""
        for parts, mode in restricted:
            placed = self._placed(parts)
            if placed is None:
                continue  # merged into an existing directory, which keeps its mode
            parent: _Where = (placed[0], placed[1][:-1])
            name = placed[1][-1]
            # Through the parent: a directory that denies search cannot be
            # left through its own "..".
            self._chmod(parent, name, mode)
            self._journal.did(self._chmod, parent, name, mode | 0o700)

    def _chmod(self, parent: _Where, name: str, mode: int) -> None:
        fd = os.open(name, DIR_FLAGS, dir_fd=self._at(parent))
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def _placed(self, parts: list[str]) -> _Where | None:
        for i in range(len(parts) + 1):
            moved = self._moved.get(tuple(parts[:i]))
            if moved is not None:
                return moved[0], moved[1] + parts[i:]
        return None


def _copy_tree(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """Copy the staged entry ``src`` (a file, symlink or directory tree) to
    ``dst``, on another mount: modes and mtimes kept, one fd per tree."""
    walk = TreeWalk(src_fd, names=[src])
    out = DirCursor(dst_fd)
    try:
        for name, st, leaving in walk:
            target = name if walk.path else dst
            if leaving:
                # Times last: filling the directory changed them.
                os.fchmod(out.fd, stat.S_IMODE(st.st_mode))
                os.utime(out.fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                out.up()
            elif stat.S_ISDIR(st.st_mode):
                os.mkdir(target, 0o700, dir_fd=out.fd)
                walk.descend(name)
                out.down(target)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(name, dir_fd=walk.fd), target, dir_fd=out.fd)
                os.utime(
                    target,
                    ns=(st.st_atime_ns, st.st_mtime_ns),
                    dir_fd=out.fd,
                    follow_symlinks=False,
                )
            else:  # staging holds nothing else
                _copy_file(walk.fd, name, st, out.fd, target)
    finally:
        walk.close()
        out.close()


def _copy_file(src_fd: int, src: str, st: os.stat_result, dst_fd: int, dst: str) -> None:
    inp = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
    try:
        out = os.open(
            dst,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dst_fd,
        )
        try:
            offset = 0
            while offset < st.st_size:
                sent = os.sendfile(out, inp, offset, min(st.st_size - offset, _COPY_STEP))
                if not sent:
                    raise OSError(errno.EIO, "staged file shrank", src)
                offset += sent
            os.fchmod(out, stat.S_IMODE(st.st_mode))
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(out)
    finally:
        os.close(inp)

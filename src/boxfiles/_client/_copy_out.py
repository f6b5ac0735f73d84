"""copy_out: a path in a box to a local file or tree.

What ``download_tar`` receives goes, through a bounded channel, to a worker
thread that unpacks it into a hidden staging directory beside the
destination; the result is moved into place (see :mod:`._place`) only once
the server reported OK and the archive proved sound.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import secrets
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import final

import trio

from .._errors import IncompleteTransfer, LocalIOError, UnsafeArchive
from .._fs import DIR_FLAGS, TreeWalk, remove_tree
from .._supervise import supervise
from .._tar._paxtime import mtime_ns
from .._tar._read import ChunkStream, CorruptArchive, next_member, open_archive, write_member
from .._tar._rules import MAX_ARCHIVE_ENTRIES, MODE_MASK, BadEntry, entry_parts
from .._wire import (
    check_container_id,
    check_path,
)
from ._local import ChunkWriter, describe_oserror, local_error, local_path
from ._place import Placement, times_of
from ._progress import Meter, Progress, check_progress
from ._transfer import Calls


@final
@dataclass
class _Extracted:
    """What the extraction thread made of the archive, relative to staging."""

    #: Every directory the archive made there, and only those: what else is
    #: there (files, links) is found with lstat when it matters, so a merge
    #: of many files keeps nothing per file.
    dirs: set[str] = field(default_factory=set)
    root_meta: tuple[int, int] | None = None  # the "./" entry: (mode, mtime_ns)


def _safe_name(name: str, what: str = "entry") -> str:
    """An archive name as a relative path, by the shared entry rules."""
    try:
        return "/".join(entry_parts(name, what))
    except BadEntry as err:
        raise UnsafeArchive(str(err)) from None


def _extract(reader: ChunkStream, staging: str) -> _Extracted:
    """Unpack the stream into ``staging`` (blocking; a worker thread).

    ``staging`` is a fresh directory of ours; every decision is made from
    what this archive created in it (its directories recorded in ``dirs``),
    and files are opened with O_NOFOLLOW | O_EXCL, so no entry can reach
    outside it.
    """
    out = _Extracted()
    dir_meta: dict[str, tuple[int, int]] = {}
    try:
        tar = open_archive(reader)
    except CorruptArchive as err:
        raise UnsafeArchive(f"the server sent a corrupt archive: {err}") from err
    except tarfile.ReadError as err:
        if reader.eof:
            raise IncompleteTransfer("the server sent an empty or truncated archive") from err
        raise UnsafeArchive(f"the server sent a corrupt archive: {err}") from err
    except (ValueError, OverflowError) as err:  # absurd numbers in the first header
        raise UnsafeArchive(f"corrupt archive header: {err}") from err
    entries = 0
    try:
        while True:
            try:
                member = next_member(tar)
            except CorruptArchive as err:
                raise UnsafeArchive(f"corrupt archive: {err}") from err
            except tarfile.ReadError as err:
                if reader.eof:
                    raise IncompleteTransfer(f"the archive ended early: {err}") from err
                raise UnsafeArchive(f"corrupt archive: {err}") from err
            except (ValueError, OverflowError) as err:  # absurd numbers in a header
                raise UnsafeArchive(f"corrupt archive header: {err}") from err
            if member is None:
                break
            entries += 1
            if entries > MAX_ARCHIVE_ENTRIES:
                raise UnsafeArchive(f"the archive holds more than {MAX_ARCHIVE_ENTRIES} entries")
            try:
                _extract_one(member, reader, staging, dir_meta, out)
            except tarfile.ReadError as err:  # the data of a file ran out
                raise IncompleteTransfer(f"the archive ended inside {member.name!r}") from err
            except (ValueError, OverflowError) as err:  # a NaN or far-off mtime, say
                raise UnsafeArchive(f"bad archive entry {member.name!r}: {err}") from err
    finally:
        tar.close()
    # Deepest first: a directory's own mode could forbid writing its children,
    # and writing them changes its mtime.
    for rel in sorted(dir_meta, key=lambda r: r.count("/"), reverse=True):
        mode, mtime = dir_meta[rel]
        path = os.path.join(staging, rel)
        os.chmod(path, mode)
        try:
            os.utime(path, ns=(mtime, mtime))
        except (ValueError, OverflowError) as err:
            raise UnsafeArchive(f"bad archive entry {rel!r}: {err}") from err
    return out


def _extract_one(
    member: tarfile.TarInfo,
    reader: ChunkStream,
    staging: str,
    dir_meta: dict[str, tuple[int, int]],
    out: _Extracted,
) -> None:
    rel = _safe_name(member.name)
    mode = member.mode & MODE_MASK
    mtime = mtime_ns(member)
    if not rel:
        if not member.isdir():
            raise UnsafeArchive(f"archive root entry is not a directory: {member.name!r}")
        out.root_meta = (mode, mtime)
        return
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        kind = "fifo" if member.isfifo() else "device node" if member.isdev() else "special"
        raise UnsafeArchive(f"refused {kind} entry in archive: {member.name!r}")
    dirs = out.dirs
    # Every name in dirs has its parents there (a replaced directory takes
    # its names with it), so only the parents above the nearest recorded
    # one are looked at: O(depth) per entry, not O(depth**2).
    missing = []
    parent = posixpath.dirname(rel)
    while parent and parent not in dirs:
        missing.append(parent)
        parent = posixpath.dirname(parent)
    for prefix in reversed(missing):  # parents the archive did not list: make them
        try:
            os.mkdir(os.path.join(staging, prefix), 0o700)
        except FileExistsError:  # an entry of the archive, and not a directory
            there = _kind(os.lstat(os.path.join(staging, prefix)))
            raise UnsafeArchive(
                f"archive entry would be written through a {there}: {member.name!r}"
            ) from None
        dirs.add(prefix)
    path = os.path.join(staging, rel)
    existing = "dir" if rel in dirs else _kind(_lstat(path))
    # A later entry of the same name replaces an earlier one, as tar does
    # (never writes through it); only a directory followed by a directory
    # is merged.
    if existing == "dir" and not member.isdir():
        _remove_dir(staging, rel, out.dirs, dir_meta)
        existing = None
    elif existing is not None and existing != "dir":
        os.unlink(path)
        existing = None
    if member.isdir():
        if existing is None:
            os.mkdir(path, 0o700)
        dir_meta[rel] = (mode, mtime)
        dirs.add(rel)
    elif member.isreg():
        _write_file(member, reader, path, mode, mtime)
    elif member.issym():
        os.symlink(member.linkname, path)
        os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
    else:
        target = _safe_name(member.linkname, f"hard link {member.name} ->")
        # A file the archive made: its parents are directories it made (not
        # links), and it is a regular file itself.
        held_by = posixpath.dirname(target)
        if (held_by and held_by not in dirs) or _kind(
            _lstat(os.path.join(staging, target))
        ) != "file":
            raise UnsafeArchive(
                f"hard link to something outside the archive: {member.name!r} -> {member.linkname!r}"
            )
        os.link(os.path.join(staging, target), path, follow_symlinks=False)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _kind(st: os.stat_result | None) -> str | None:
    """What the archive made (only directories, files and links)."""
    if st is None:
        return None
    return "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "file"


def _remove_dir(
    staging: str, rel: str, dirs: set[str], dir_meta: dict[str, tuple[int, int]]
) -> None:
    """Remove the staged directory ``rel`` (a later entry replaces it) and
    forget every directory under it: work in proportion to what it holds,
    so an archive replacing directories over and over stays linear."""
    top, name = posixpath.split(rel)
    fd = os.open(os.path.join(staging, top), DIR_FLAGS)
    try:
        walk = TreeWalk(fd, names=[name])
        try:
            for child, child_st, leaving in walk:
                if stat.S_ISDIR(child_st.st_mode) and not leaving:
                    key = posixpath.join(top, *walk.path, child)
                    dirs.discard(key)
                    dir_meta.pop(key, None)
                    walk.descend(child)  # staged directories stay 0o700 until the end
        finally:
            walk.close()
        remove_tree(fd, name)
    finally:
        os.close(fd)


def _write_file(
    member: tarfile.TarInfo,
    reader: ChunkStream,
    path: str,
    mode: int,
    mtime: int,
) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        write_member(member, reader, fd)
        os.fchmod(fd, mode)
        os.utime(fd, ns=(mtime, mtime))
    finally:
        os.close(fd)


def _channel_writer(channel: trio.MemorySendChannel[Sequence[bytes | memoryview]]) -> ChunkWriter:
    """Where the download writes: the extractor's channel, each batch as the
    views it came in (the extractor writes files from them, never joined)."""

    async def write(pieces: Sequence[bytes | memoryview]) -> None:
        try:
            await channel.send(pieces)
        except trio.BrokenResourceError:
            # The extractor stopped; its error (raised in the same nursery)
            # says why, and this task is about to be cancelled.
            await trio.sleep_forever()

    return ChunkWriter(write)


#: Names inside the staging directory: the archive's tree, and the trash
#: that placement moves replaced entries to.
_TREE, _TRASH = "t", "x"


@final
@dataclass
class _Target:
    """Where copy_out writes: ``base_fd`` is ``dest`` when it is a directory
    (reached as the caller's path, a symlink to a directory included), else
    the directory ``dest`` is to appear in as ``name``. Staging lives there."""

    base_fd: int
    base_path: str
    name: str  # "" when dest is the directory itself
    staging: str
    default_mode: int  # what a new directory gets here (0o777 less the umask)
    times: tuple[int, int]  # the base directory's, put back after a failure

    def finish(self, placed: bool) -> None:
        """Remove the staging directory; after a failure, also put back the
        base directory's times, which making staging in it changed."""
        try:
            remove_tree(self.base_fd, self.staging)
            if not placed:
                os.utime(self.base_fd, ns=self.times)
        finally:
            os.close(self.base_fd)


def _prepare(dest: str) -> _Target:
    """Open where ``dest`` goes and make the staging directory there (blocking)."""
    dest_is_dir = os.path.isdir(dest)
    if not dest_is_dir and dest.endswith("/"):
        raise FileNotFoundError(errno.ENOENT, "No such directory", dest)
    base_path, name = (dest, "") if dest_is_dir else os.path.split(os.path.abspath(dest))
    base_fd = os.open(base_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    staging = f".boxfiles-{secrets.token_hex(6)}.part"
    try:
        times = times_of(os.fstat(base_fd))
        # Made with the umask applied, to learn the mode a new directory gets
        # (os.umask() cannot be read without changing it for every thread);
        # then closed to others while it fills.
        os.mkdir(staging, 0o777, dir_fd=base_fd)
        target = _Target(base_fd, base_path, name, staging, 0, times)
    except BaseException:
        os.close(base_fd)
        raise
    try:
        target.default_mode = stat.S_IMODE(
            os.stat(staging, dir_fd=base_fd, follow_symlinks=False).st_mode
        )
        os.chmod(staging, 0o700, dir_fd=base_fd)
        for inner in (_TREE, _TRASH):
            os.mkdir(os.path.join(staging, inner), 0o700, dir_fd=base_fd)
    except BaseException:
        target.finish(placed=False)
        raise
    return target


def _top_name(src_path: str) -> str:
    """The top-level entry an archive of ``src_path`` has (as servers name it)."""
    parts = [p for p in src_path.split("/") if p not in ("", ".")]
    return parts[-1] if parts else "."


def _place(target: _Target, extracted: _Extracted, src_path: str, *, contents: bool) -> None:
    """Move the extracted tree from staging to where docker cp would put it;
    on any failure, undo every step (blocking)."""
    if contents:
        src, kind, name = [target.staging, _TREE], "dir", target.name
        mode, mtime = extracted.root_meta or (target.default_mode, None)
    else:
        tree_fd = os.open(os.path.join(target.staging, _TREE), DIR_FLAGS, dir_fd=target.base_fd)
        try:
            top = os.listdir(tree_fd)
        finally:
            os.close(tree_fd)
        if len(top) != 1:
            raise UnsafeArchive(f"expected one top-level entry in the archive, got {len(top)}")
        expected = _top_name(src_path)
        if top[0] != expected:
            # A server naming its entry after something it guesses is in dest.
            raise UnsafeArchive(f"archive of {src_path!r} has top-level entry {top[0]!r}")
        src = [target.staging, _TREE, top[0]]
        kind = "dir" if top[0] in extracted.dirs else "other"
        name = target.name or top[0]
        mode, mtime = 0, None
        if kind == "dir":
            st = os.stat(os.path.join(*src), dir_fd=target.base_fd, follow_symlinks=False)
            mode, mtime = stat.S_IMODE(st.st_mode), st.st_mtime_ns
    trash_fd = os.open(os.path.join(target.staging, _TRASH), DIR_FLAGS, dir_fd=target.base_fd)
    try:
        placement = Placement(target.base_fd, target.base_path, trash_fd)
        try:
            placement.place(src, kind, name, (mode, mtime))
        except BaseException:
            placement.journal.roll_back()
            raise
    finally:
        os.close(trash_fd)


async def copy_out(
    calls: Calls,
    src_path: str,
    dest: str | os.PathLike[str],
    *,
    container_id: str | None,
    follow_symlinks: bool,
    progress: Progress | None,
) -> None:
    """See :meth:`FilesClient.copy_out`."""
    check_path(src_path, "src_path")
    check_container_id(container_id)
    check_progress(progress)
    dest_text = local_path(dest, "dest")
    # The box's root has no name to land by: it always means its contents.
    contents = src_path.endswith("/.") or src_path.strip("/") in ("", ".")

    try:
        target = await trio.to_thread.run_sync(_prepare, dest_text)
    except OSError as err:
        # Name dest, not the staging directory the user never asked for.
        raise LocalIOError(f"cannot write {dest_text}: {describe_oserror(err)}") from err
    staging = os.path.join(target.base_path, target.staging, _TREE)
    meter = Meter(progress, None)
    # Unbuffered: the download queues its CHANNEL_CAPACITY chunks already, so
    # a batch is handed over only when the extractor takes it.
    send_chunks, receive_chunks = trio.open_memory_channel[Sequence[bytes | memoryview]](0)
    extracted: _Extracted | None = None

    async def extract() -> None:
        nonlocal extracted
        async with receive_chunks:
            reader = ChunkStream(receive_chunks)
            try:
                extracted = await trio.to_thread.run_sync(_extract, reader, staging)
            except OSError as err:
                raise local_error(err, dest_text, "cannot write") from err
            # Anything after the end-of-archive marker is read and dropped, so
            # the server can finish and report its status.
            async for _ in receive_chunks:
                pass

    async def download() -> None:
        async with send_chunks:
            await calls.download(
                src_path,
                _channel_writer(send_chunks),
                meter,
                container_id=container_id,
                include_parent=True,
                follow_symlinks=follow_symlinks,
            )

    try:
        await supervise(extract, download)
        assert extracted is not None
        done = extracted
        try:
            await trio.to_thread.run_sync(lambda: _place(target, done, src_path, contents=contents))
        except OSError as err:
            raise local_error(err, dest_text, "cannot write") from err
    except BaseException:
        with trio.CancelScope(shield=True), contextlib.suppress(OSError):
            # The failure that got here is the one to report.
            await trio.to_thread.run_sync(target.finish, False)
        raise
    with trio.CancelScope(shield=True):
        try:
            await trio.to_thread.run_sync(target.finish, True)
        except OSError as err:
            raise local_error(err, dest_text, "cannot clean up staging in") from err
    meter.finish()

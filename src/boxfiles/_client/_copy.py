"""copy_in / copy_out: local paths in and out of a box, as tar on the fly.

copy_in packs the source in a worker thread straight into the upload's
pooled chunk buffers, handed over a trio channel to the upload_tar transfer:
no temporary tar file, no whole-tree buffering, no copies but the kernel's.
copy_out feeds what ``download_tar`` receives, through a bounded channel, to
a worker thread that unpacks it into a hidden staging directory
beside the destination; the result is moved into place only once the server
reported OK and the archive proved sound.

Buffers handed between a worker thread and the trio thread are allocated and
freed in the trio thread (see ``_local`` and docs/contract.md, "What real
peers do").
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import grp
import os
import posixpath
import pwd
import secrets
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, final

import trio

from .._errors import FailedPrecondition, IncompleteTransfer, LocalIOError, UnsafeArchive
from .._server._confine import DIR_FLAGS
from .._server._extract import MODE_MASK, Journal
from .._supervise import supervise
from .._tar._paxtime import mtime_ns, set_mtime_ns
from .._tar._stream import ChunkStream, CorruptArchive, next_member, open_archive, write_member
from .._wire import (
    DEFAULT_CHUNK_SIZE,
    HEADER_ROOM,
    Chunk,
    check_container_id,
    check_path,
    first_upload_chunk,
)
from ._local import ChunkReader, UploadBuffers, describe_oserror
from ._progress import Meter, Progress, check_progress

if TYPE_CHECKING:
    from ._client import FilesClient

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"  # non-UTF-8 file names survive the round trip


def _local_error(
    err: OSError, path: str | os.PathLike[str], what: str = "cannot read"
) -> LocalIOError:
    name = err.filename if isinstance(err.filename, str) else os.fspath(path)
    return LocalIOError(f"{what} {name}: {describe_oserror(err)}")


# --------------------------------------------------------------------------
# copy_in: packing


@final
@dataclass(frozen=True)
class _PackPlan:
    path: str  # what to pack (the symlink itself unless follow_symlinks)
    is_dir: bool
    follow_top: bool  # stat the top entry through a symlink
    root: str = "."  # a directory's own name in the archive: "." for its contents


def _plan(src: str, follow_symlinks: bool) -> _PackPlan:
    path = src[:-2] if src.endswith("/.") else src
    path = path.rstrip("/") or "/"
    st = os.stat(path) if follow_symlinks else os.lstat(path)
    return _PackPlan(path, stat.S_ISDIR(st.st_mode), follow_symlinks)


@final
class _Names:
    """uid/gid to user/group names, looked up once each."""

    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = ""
        return self._users[uid]

    def group(self, gid: int) -> str:
        if gid not in self._groups:
            try:
                self._groups[gid] = grp.getgrgid(gid).gr_name
            except KeyError:
                self._groups[gid] = ""
        return self._groups[gid]


def _walk(plan: _PackPlan) -> Iterator[tuple[str, str, os.stat_result]]:
    """(path, arcname, stat) for every entry, parents before children.

    A directory is packed rooted at ``plan.root``: ``./`` (its contents) or
    its own name; a file or link by its basename. Only the top entry is followed when follow_symlinks is
    set (like ``docker cp -L``); links inside a directory stay links.
    """
    top = os.stat(plan.path) if plan.follow_top else os.lstat(plan.path)
    if not stat.S_ISDIR(top.st_mode):
        yield plan.path, os.path.basename(plan.path) or ".", top
        return
    yield plan.path, plan.root, top
    stack = [(plan.path, plan.root)]
    while stack:
        directory, arc = stack.pop()
        with os.scandir(directory) as entries:
            children = sorted(entries, key=lambda e: e.name)
        subdirs = []
        for entry in children:
            st = entry.stat(follow_symlinks=False)
            child_arc = f"{arc}/{entry.name}"
            yield entry.path, child_arc, st
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((entry.path, child_arc))
        stack.extend(reversed(subdirs))


def _tarinfo(
    path: str, arcname: str, st: os.stat_result, names: _Names, inodes: dict[tuple[int, int], str]
) -> tarfile.TarInfo | None:
    """The header for one entry; None for a socket (skipped, like GNU tar)."""
    info = tarfile.TarInfo(arcname)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in inodes:
            info.type = tarfile.LNKTYPE
            info.linkname = inodes[key]
        else:
            if st.st_nlink > 1:
                inodes[key] = arcname
            info.type = tarfile.REGTYPE
            info.size = st.st_size
    elif stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)
    elif stat.S_ISSOCK(mode):
        return None
    else:
        # Refused here, though the server's download skips them: no server
        # accepts one in an upload, so failing now, naming it, beats a
        # refusal of the whole archive after it was sent.
        kind = "fifo" if stat.S_ISFIFO(mode) else "device node"
        raise LocalIOError(f"cannot copy {path}: it is a {kind}")
    info.mode = stat.S_IMODE(mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname, info.gname = names.user(st.st_uid), names.group(st.st_gid)
    set_mtime_ns(info, st.st_mtime_ns)
    return info


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, _ENCODING, _ERRORS)


def _padding(size: int, unit: int) -> int:
    return -size % unit


def archive_size(plan: _PackPlan) -> int:
    """The exact size of the archive :func:`_pack` will produce for ``plan``
    if the tree does not change meanwhile (stats and headers only)."""
    names, inodes = _Names(), dict[tuple[int, int], str]()
    total = 0
    for path, arcname, st in _walk(plan):
        info = _tarinfo(path, arcname, st, names, inodes)
        if info is None:
            continue
        total += len(_header(info))
        if info.type == tarfile.REGTYPE:
            total += info.size + _padding(info.size, BLOCK)
    total += 2 * BLOCK
    return total + _padding(total, RECORD)


@final
class _ChunkSink:
    """Used from the packing thread: fills the upload's pooled chunk buffers
    in place and hands each full one on as a Chunk. Buffers are taken, sent
    and (once sent) given back in the trio thread, so the allocator reuses
    them, and the archive's bytes are copied only by the kernel's reads."""

    def __init__(
        self, channel: trio.MemorySendChannel[Chunk], buffers: UploadBuffers, chunk_size: int
    ) -> None:
        self._channel = channel
        self._buffers = buffers
        self._size = chunk_size
        self._buffer: bytearray | None = None
        self._used = 0

    async def _hand_on(self, full: Chunk | None) -> bytearray:
        if full is not None:
            await self._channel.send(full)
        return await self._buffers.take()

    def _room(self) -> memoryview:
        """The free part of the current buffer; a full one is handed on first."""
        if self._buffer is None or self._used == self._size:
            full = None if self._buffer is None else self._chunk()
            self._buffer = trio.from_thread.run(self._hand_on, full)
            self._used = 0
        return memoryview(self._buffer)[HEADER_ROOM + self._used : HEADER_ROOM + self._size]

    def _chunk(self) -> Chunk:
        assert self._buffer is not None
        return Chunk(self._buffer, self._used, self._buffers.give_back)

    def flush(self) -> None:
        """Hand on what the current buffer holds."""
        if self._used:
            trio.from_thread.run(self._channel.send, self._chunk())
            self._buffer, self._used = None, 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            room = self._room()
            take = min(len(room), len(view))
            room[:take] = view[:take]
            self._used += take
            view = view[take:]

    def copy_from(self, fd: int, size: int, name: str) -> None:
        """Append exactly ``size`` bytes read from ``fd``, straight into the buffers."""
        left = size
        while left:
            room = self._room()
            got = os.readv(fd, [room[:left]])
            if got == 0:
                # The server pads a shrunk file with zeros (its download has no
                # way to fail an entry); here the caller can be told, and the
                # upload is reset before anything is written.
                raise LocalIOError(f"cannot read {name}: it shrank while being copied")
            self._used += got
            left -= got


def _pack(plan: _PackPlan, sink: _ChunkSink) -> None:
    """Write the whole archive into ``sink`` (blocking; a worker thread)."""
    names, inodes = _Names(), dict[tuple[int, int], str]()
    zeros = bytes(RECORD)
    total = 0
    for path, arcname, st in _walk(plan):
        info = _tarinfo(path, arcname, st, names, inodes)
        if info is None:
            continue
        header = _header(info)
        sink.write(header)
        total += len(header)
        if info.type != tarfile.REGTYPE:
            continue
        replaced = LocalIOError(f"cannot read {path}: it was replaced while being copied")
        try:
            follow = plan.follow_top and path == plan.path
            # O_NONBLOCK: a fifo put in the file's place must not hang the open.
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(path, flags | (0 if follow else os.O_NOFOLLOW))
        except OSError as err:
            if err.errno == errno.ELOOP and path != plan.path:
                raise replaced from err
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise replaced
            sink.copy_from(fd, info.size, path)
        finally:
            os.close(fd)
        pad = _padding(info.size, BLOCK)
        sink.write(zeros[:pad])
        total += info.size + pad
    sink.write(zeros[: 2 * BLOCK])
    total += 2 * BLOCK
    sink.write(zeros[: _padding(total, RECORD)])
    sink.flush()


def _local_path(value: object, what: str) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path, not {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text:
        raise ValueError(f"{what} must be a non-empty str path")
    return text


async def copy_in(
    client: FilesClient,
    src: str | os.PathLike[str],
    dest_path: str,
    *,
    container_id: str | None,
    follow_symlinks: bool,
    mkdir_parents: bool,
    overwrite: bool,
    progress: Progress | None,
) -> None:
    """See :meth:`FilesClient.copy_in`."""
    check_path(dest_path, "dest_path")
    container = check_container_id(container_id)
    check_progress(progress)
    src_text = _local_path(src, "src")
    try:
        plan = await trio.to_thread.run_sync(_plan, src_text, follow_symlinks)
    except OSError as err:
        raise _local_error(err, src_text) from err
    name = os.path.basename(plan.path)
    if plan.is_dir:
        # docker cp: a directory copied onto an existing directory lands
        # inside it under its own name; anywhere else it becomes dest_path,
        # but never replaces a file (overwrite is for a file by a file).
        kind = await client._remote_kind(dest_path, container_id=container_id)
        if kind == "file":
            raise FailedPrecondition(f"cannot overwrite non-directory {dest_path} with a directory")
        if kind == "dir" and not src_text.endswith("/.") and name:
            plan = dataclasses.replace(plan, root=name)
    try:
        total = await trio.to_thread.run_sync(archive_size, plan) if progress else None
    except OSError as err:
        raise _local_error(err, src_text) from err
    first = first_upload_chunk(
        dest_path,
        container,
        mkdir_parents=mkdir_parents,
        overwrite=overwrite,
        source_is_dir=plan.is_dir,
    )
    meter = Meter(progress, total)
    send_chunks, receive_chunks = trio.open_memory_channel[Chunk](0)

    async def read(max_bytes: int) -> Chunk:
        try:
            chunk = await receive_chunks.receive()
        except trio.EndOfChannel:
            meter.finish()
            return Chunk.of(b"")
        meter.add(chunk.size)
        return chunk

    buffers = UploadBuffers(client._buffers, DEFAULT_CHUNK_SIZE)

    async def pack() -> None:
        try:
            await trio.to_thread.run_sync(
                _pack, plan, _ChunkSink(send_chunks, buffers, DEFAULT_CHUNK_SIZE)
            )
        except OSError as err:
            raise _local_error(err, src_text) from err
        # Closing is the only end-of-data signal (see _client._upload.read).
        await send_chunks.aclose()

    async def upload() -> None:
        async with receive_chunks:
            await client._upload_from(ChunkReader(read, DEFAULT_CHUNK_SIZE), first)

    try:
        await supervise(pack, upload)
    finally:
        buffers.close()


# --------------------------------------------------------------------------
# copy_out: safe streaming extraction


@final
@dataclass
class _Extracted:
    """What the extraction thread made of the archive, relative to staging."""

    kinds: dict[str, str] = field(default_factory=dict)  # "dir" / "file" / "link"
    root_meta: tuple[int, int] | None = None  # the "./" entry: (mode, mtime_ns)


def _safe_name(name: str) -> str:
    """An archive name as a relative path; raise UnsafeArchive if it escapes."""
    if "\x00" in name:
        raise UnsafeArchive(f"archive entry name contains NUL: {name!r}")
    if name.startswith("/"):
        raise UnsafeArchive(f"absolute archive entry name: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"archive entry name contains '..': {name!r}")
    return "/".join(parts)


def _extract(reader: ChunkStream, staging: str) -> _Extracted:
    """Unpack the stream into ``staging`` (blocking; a worker thread).

    ``staging`` is a fresh directory of ours; every decision is made from
    what this archive created in it (recorded in ``kinds``), and files are
    opened with O_NOFOLLOW | O_EXCL, so no entry can reach outside it.
    """
    out = _Extracted()
    kinds = out.kinds
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
            try:
                _extract_one(member, reader, staging, kinds, dir_meta, out)
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
    kinds: dict[str, str],
    dir_meta: dict[str, tuple[int, int]],
    out: _Extracted,
) -> None:
    rel = _safe_name(member.name)
    mode = member.mode & MODE_MASK  # as the server: set-id bits dropped, sticky kept
    mtime = mtime_ns(member)
    if not rel:
        if not member.isdir():
            raise UnsafeArchive(f"archive root entry is not a directory: {member.name!r}")
        out.root_meta = (mode, mtime)
        return
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        kind = "fifo" if member.isfifo() else "device node" if member.isdev() else "special"
        raise UnsafeArchive(f"refused {kind} entry in archive: {member.name!r}")
    # Every name in kinds has its parents there as directories (a replaced
    # directory takes its names with it), so the nearest recorded parent is
    # the only one to check: O(depth) per entry, not O(depth**2).
    missing = []
    parent = posixpath.dirname(rel)
    while parent and parent not in kinds:
        missing.append(parent)
        parent = posixpath.dirname(parent)
    if parent and kinds[parent] != "dir":
        raise UnsafeArchive(
            f"archive entry would be written through a {kinds[parent]}: {member.name!r}"
        )
    for prefix in reversed(missing):  # parents the archive did not list: make them
        os.mkdir(os.path.join(staging, prefix), 0o700)
        kinds[prefix] = "dir"
    path = os.path.join(staging, rel)
    existing = kinds.get(rel)
    # A later entry of the same name replaces an earlier one, as tar does
    # (never writes through it); only a directory followed by a directory
    # is merged.
    if existing == "dir" and not member.isdir():
        _forget(rel, kinds, dir_meta)
        parent, name = os.path.split(path)
        fd = os.open(parent, DIR_FLAGS)
        try:
            _remove_tree(fd, name)
        finally:
            os.close(fd)
        existing = None
    elif existing is not None and existing != "dir":
        os.unlink(path)
        existing = None
    if member.isdir():
        if existing is None:
            os.mkdir(path, 0o700)
        dir_meta[rel] = (mode, mtime)
        kinds[rel] = "dir"
    elif member.isreg():
        _write_file(member, reader, path, mode, mtime)
        kinds[rel] = "file"
    elif member.issym():
        os.symlink(member.linkname, path)
        os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
        kinds[rel] = "link"
    else:
        target = _safe_name(member.linkname)
        if kinds.get(target) != "file":
            raise UnsafeArchive(
                f"hard link to something outside the archive: {member.name!r} -> {member.linkname!r}"
            )
        os.link(os.path.join(staging, target), path, follow_symlinks=False)
        kinds[rel] = "file"


def _forget(rel: str, kinds: dict[str, str], dir_meta: dict[str, tuple[int, int]]) -> None:
    """Drop ``rel`` and everything recorded under it (it is being replaced)."""
    under = rel + "/"
    for known in (kinds, dir_meta):
        for name in [n for n in known if n == rel or n.startswith(under)]:
            del known[name]


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


# --------------------------------------------------------------------------
# copy_out: placement, over directory descriptors
#
# Nothing found in the destination is ever followed: each directory is
# opened by name with O_NOFOLLOW from an open parent, and every other call
# takes a parent's descriptor and a single name (a symlink there is the
# entry itself, and is replaced like a file). Only ``dest`` itself is a path,
# resolved as the caller gave it.

#: Directory descriptors placement holds at once, whatever the tree's depth:
#: the destination's directory, the staging directory's trash, one cursor in
#: the staged tree and one in the destination, and one more being opened or
#: listed. A walk keeps names, not descriptors, for the levels above it.
MAX_PLACE_FDS = 6


@final
class _Cursor:
    """One directory descriptor walked down by name and back up by "..".

    Going down never follows a symlink (DIR_FLAGS); going up checks that
    ".." is the directory that was left, so a tree moved meanwhile fails
    instead of being walked somewhere else. Holds one descriptor at any depth.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._above: list[tuple[int, int]] = []  # (st_dev, st_ino) of each level left

    def down(self, name: str) -> None:
        fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        st = os.fstat(self.fd)
        self._above.append((st.st_dev, st.st_ino))
        os.close(self.fd)
        self.fd = fd

    def up(self) -> None:
        fd = os.open("..", DIR_FLAGS, dir_fd=self.fd)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self._above.pop():
            os.close(fd)
            raise OSError(errno.ESTALE, "Directory moved while being copied")
        os.close(self.fd)
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def _open_dir(dir_fd: int, parts: list[str]) -> _Cursor:
    """A cursor at ``parts`` below ``dir_fd`` (which stays the caller's)."""
    cursor = _Cursor(os.dup(dir_fd))
    try:
        for part in parts:
            cursor.down(part)
    except BaseException:
        cursor.close()
        raise
    return cursor


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _set_dir_meta(dir_fd: int, name: str, mode: int, times: tuple[int, int]) -> None:
    """chmod and utime a directory through a descriptor (a chmod by name
    would follow a symlink swapped in meanwhile)."""
    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
        os.utime(fd, ns=times)
    finally:
        os.close(fd)


def _remove_tree(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` and all under it: iteratively, never
    following a symlink, holding two descriptors at any depth."""
    st = _lstat(dir_fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    # Modes restored from an archive (a 0o500 directory) must not stop it.
    os.chmod(name, 0o700, dir_fd=dir_fd)
    cursor = _open_dir(dir_fd, [name])
    try:
        levels = [(name, list[str]())]  # each level's name and subdirectories left
        listed = False
        while levels:
            if not listed:
                for child in os.listdir(cursor.fd):
                    child_st = _lstat(cursor.fd, child)
                    if child_st is not None and stat.S_ISDIR(child_st.st_mode):
                        levels[-1][1].append(child)
                    elif child_st is not None:
                        os.unlink(child, dir_fd=cursor.fd)
                listed = True
            subdirs = levels[-1][1]
            if subdirs:
                child = subdirs.pop()
                os.chmod(child, 0o700, dir_fd=cursor.fd)
                cursor.down(child)
                levels.append((child, []))
                listed = False
                continue
            done, _ = levels.pop()
            if levels:
                cursor.up()
                os.rmdir(done, dir_fd=cursor.fd)
    finally:
        cursor.close()
    os.rmdir(name, dir_fd=dir_fd)


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
class _Placement:
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

    def _show(self, parts: list[str]) -> str:
        return os.path.join(self._shown, *parts)

    def _spare(self) -> str:
        self._spares += 1
        return str(self._spares)

    def _to_trash(self, dir_fd: int, name: str, parts: list[str]) -> None:
        """Move the existing ``name`` (at ``parts``) out of the way."""
        spare = self._spare()
        os.rename(name, spare, src_dir_fd=dir_fd, dst_dir_fd=self._trash)

        def undo() -> None:
            cursor = _open_dir(self._base, parts[:-1])
            try:
                os.rename(spare, parts[-1], src_dir_fd=self._trash, dst_dir_fd=cursor.fd)
            finally:
                cursor.close()

        self.journal.did(undo)

    def _move_in(
        self, src_fd: int, dst_fd: int, name: str, parts: list[str], st: os.stat_result
    ) -> None:
        """Move the staged ``name`` to ``parts`` (free now), with its mode and
        times: a directory changing parent must be writable (its ".."
        changes), and that change touches its mtime."""
        is_dir = stat.S_ISDIR(st.st_mode)
        if is_dir:
            os.chmod(name, 0o700, dir_fd=src_fd)  # staged by us: a directory, not a link
        os.rename(name, parts[-1], src_dir_fd=src_fd, dst_dir_fd=dst_fd)

        def undo() -> None:
            cursor = _open_dir(self._base, parts[:-1])
            try:
                os.rename(parts[-1], self._spare(), src_dir_fd=cursor.fd, dst_dir_fd=self._trash)
            finally:
                cursor.close()

        self.journal.did(undo)
        if is_dir:
            _set_dir_meta(dst_fd, parts[-1], stat.S_IMODE(st.st_mode), _times(st))

    def _keep_meta(self, parts: list[str], st: os.stat_result) -> None:
        """Have an undo put back an existing directory's mode and times
        (entries moving in and out change its mtime)."""
        mode, times = stat.S_IMODE(st.st_mode), _times(st)

        def undo() -> None:
            cursor = _open_dir(self._base, parts)
            try:
                os.fchmod(cursor.fd, mode)
                os.utime(cursor.fd, ns=times)
            finally:
                cursor.close()

        self.journal.did(undo)

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
        st = _lstat(self._base, name)
        if kind != "dir":
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise LocalIOError(f"cannot overwrite directory {shown} with a non-directory")
            src = _open_dir(self._base, src_parts[:-1])
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
            self._to_trash(self._base, name, [name])
        src = _open_dir(self._base, src_parts[:-1])
        try:
            staged = os.stat(src_parts[-1], dir_fd=src.fd, follow_symlinks=False)
            mode, mtime = meta
            times = (staged.st_atime_ns, staged.st_mtime_ns if mtime is None else mtime)
            self._move_in(src.fd, self._base, src_parts[-1], [name], staged)
        finally:
            src.close()
        _set_dir_meta(self._base, name, mode, times)

    def _merge(self, src_parts: list[str], dst_parts: list[str]) -> None:
        """Move the staged directory's entries into the existing directory at
        ``dst_parts``, level by level (no recursion, two cursors)."""
        # Entries leave staged directories, even ones 0o555 in the box; a
        # 0o000 one could not even be opened (unless root).
        os.chmod(os.path.join(*src_parts), 0o700, dir_fd=self._base)
        src = _open_dir(self._base, src_parts)
        try:
            dst = _open_dir(self._base, dst_parts)
            try:
                self._keep_meta(dst_parts, os.fstat(dst.fd))
                self._walk_merge(src, dst, dst_parts)
            finally:
                dst.close()
        finally:
            src.close()

    def _walk_merge(self, src: _Cursor, dst: _Cursor, top: list[str]) -> None:
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
            parts = [*level.parts, name]
            staged = os.stat(name, dir_fd=src.fd, follow_symlinks=False)
            existing = _lstat(dst.fd, name)
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                if not stat.S_ISDIR(staged.st_mode):
                    raise LocalIOError(
                        f"cannot overwrite directory {self._show(parts)} with a non-directory"
                    )
                self._keep_meta(parts, existing)
                os.chmod(name, 0o700, dir_fd=src.fd)  # as in _merge
                src.down(name)
                dst.down(name)
                meta = (stat.S_IMODE(staged.st_mode), _times(staged))
                levels.append(_Level(sorted(os.listdir(src.fd), reverse=True), parts, meta))
                continue
            if existing is not None:  # a file or a symlink: replaced, never followed
                self._to_trash(dst.fd, name, parts)
            self._move_in(src.fd, dst.fd, name, parts, staged)


def _times(st: os.stat_result) -> tuple[int, int]:
    return st.st_atime_ns, st.st_mtime_ns


@final
class _ChannelWriter:
    """An AsyncWriter for ``download_tar`` into the extractor's channel."""

    def __init__(self, channel: trio.MemorySendChannel[bytes]) -> None:
        self._channel = channel

    async def write(self, data: bytes) -> None:
        try:
            await self._channel.send(data)
        except trio.BrokenResourceError:
            # The extractor stopped; its error (raised in the same nursery)
            # says why, and this task is about to be cancelled.
            await trio.sleep_forever()


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
            _remove_tree(self.base_fd, self.staging)
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
        times = _times(os.fstat(base_fd))
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
        top = [rel for rel in extracted.kinds if "/" not in rel]
        if len(top) != 1:
            raise UnsafeArchive(f"expected one top-level entry in the archive, got {len(top)}")
        expected = _top_name(src_path)
        if top[0] != expected:
            # A server naming its entry after something it guesses is in dest.
            raise UnsafeArchive(f"archive of {src_path!r} has top-level entry {top[0]!r}")
        src, kind = [target.staging, _TREE, top[0]], extracted.kinds[top[0]]
        name = target.name or top[0]
        mode, mtime = 0, None
        if kind == "dir":
            st = os.stat(os.path.join(*src), dir_fd=target.base_fd, follow_symlinks=False)
            mode, mtime = stat.S_IMODE(st.st_mode), st.st_mtime_ns
    trash_fd = os.open(os.path.join(target.staging, _TRASH), DIR_FLAGS, dir_fd=target.base_fd)
    try:
        placement = _Placement(target.base_fd, target.base_path, trash_fd)
        try:
            placement.place(src, kind, name, (mode, mtime))
        except BaseException:
            placement.journal.roll_back()
            raise
    finally:
        os.close(trash_fd)


async def copy_out(
    client: FilesClient,
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
    dest_text = _local_path(dest, "dest")
    # The box's root has no name to land by: it always means its contents.
    contents = src_path.endswith("/.") or src_path.strip("/") in ("", ".")

    try:
        target = await trio.to_thread.run_sync(_prepare, dest_text)
    except OSError as err:
        # Name dest, not the staging directory the user never asked for.
        raise LocalIOError(f"cannot write {dest_text}: {describe_oserror(err)}") from err
    staging = os.path.join(target.base_path, target.staging, _TREE)
    meter = Meter(progress, None)
    send_chunks, receive_chunks = trio.open_memory_channel[bytes](1)
    extracted: _Extracted | None = None

    async def extract() -> None:
        nonlocal extracted
        async with receive_chunks:
            reader = ChunkStream(receive_chunks)
            try:
                extracted = await trio.to_thread.run_sync(_extract, reader, staging)
            except OSError as err:
                raise _local_error(err, dest_text, "cannot write") from err
            # Anything after the end-of-archive marker is read and dropped, so
            # the server can finish and report its status.
            async for _ in receive_chunks:
                pass

    async def download() -> None:
        async with send_chunks:
            await client._download_into(
                src_path,
                _ChannelWriter(send_chunks),
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
            raise _local_error(err, dest_text, "cannot write") from err
    except BaseException:
        with trio.CancelScope(shield=True), contextlib.suppress(OSError):
            # The failure that got here is the one to report.
            await trio.to_thread.run_sync(target.finish, False)
        raise
    with trio.CancelScope(shield=True):
        try:
            await trio.to_thread.run_sync(target.finish, True)
        except OSError as err:
            raise _local_error(err, dest_text, "cannot clean up staging in") from err
    meter.finish()

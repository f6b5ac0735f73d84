"""copy_in / copy_out: local paths in and out of a box, as tar on the fly.

copy_in packs the source in a worker thread straight into the upload's
pooled chunk buffers, handed over a trio channel to the upload_tar transfer:
no temporary tar file, no whole-tree buffering, no copies but the kernel's.
copy_out feeds what ``download_tar`` receives, through a bounded channel, to
a worker thread that unpacks it into a hidden staging directory
beside the destination; the result is moved into place only once the server
reported OK and the archive proved sound.

Buffers handed between a worker thread and the trio thread are allocated and
freed in the trio thread (see ``_local`` and SPEC, "Facts about real peers").
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import grp
import os
import pwd
import secrets
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, final

import trio

from ._errors import IncompleteTransfer, LocalIOError, UnsafeArchive
from ._local import ChunkReader, UploadBuffers, describe_oserror
from ._paxtime import mtime_ns, set_mtime_ns
from ._progress import Meter, Progress, check_progress
from ._supervise import supervise
from ._tarstream import ChunkStream, CorruptArchive, next_member, open_archive, write_member
from ._wire import (
    DEFAULT_CHUNK_SIZE,
    HEADER_ROOM,
    Chunk,
    check_container_id,
    check_path,
    first_upload_chunk,
)

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
        try:
            follow = plan.follow_top and path == plan.path
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
        except OSError as err:
            if err.errno == errno.ELOOP and path != plan.path:
                raise LocalIOError(
                    f"cannot read {path}: it was replaced while being copied"
                ) from err
            raise
        try:
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
    if plan.is_dir and not src_text.endswith("/.") and name:
        # docker cp: a directory copied onto an existing directory lands
        # inside it under its own name; anywhere else it becomes dest_path.
        if await client._remote_kind(dest_path, container_id=container_id) == "dir":
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
    mode = member.mode & 0o777  # setuid/setgid/sticky are not restored
    mtime = mtime_ns(member)
    if not rel:
        if not member.isdir():
            raise UnsafeArchive(f"archive root entry is not a directory: {member.name!r}")
        out.root_meta = (mode, mtime)
        return
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        kind = "fifo" if member.isfifo() else "device node" if member.isdev() else "special"
        raise UnsafeArchive(f"refused {kind} entry in archive: {member.name!r}")
    parts = rel.split("/")
    for depth in range(1, len(parts)):
        prefix = "/".join(parts[:depth])
        parent = kinds.get(prefix)
        if parent is None:  # a parent the archive did not list: make it
            os.mkdir(os.path.join(staging, prefix), 0o700)
            kinds[prefix] = "dir"
        elif parent != "dir":
            raise UnsafeArchive(
                f"archive entry would be written through a {parent}: {member.name!r}"
            )
    path = os.path.join(staging, rel)
    existing = kinds.get(rel)
    if existing == "dir" and not member.isdir():
        raise UnsafeArchive(f"archive entry would replace a directory: {member.name!r}")
    if existing is not None and existing != "dir":
        os.unlink(path)  # a later entry of the same name replaces it, never writes through it
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


def _place(
    staging: str,
    extracted: _Extracted,
    dest: str,
    *,
    dest_is_dir: bool,
    contents: bool,
    default_mode: int,
) -> None:
    """Move the extracted tree from ``staging`` to where docker cp would put it.

    ``default_mode`` is what a new directory gets here (0o777 less the umask),
    for a contents archive without a ``./`` entry.
    """
    if contents:
        content, name, kind = staging, "", "dir"
    else:
        top = [rel for rel in extracted.kinds if "/" not in rel]
        if len(top) != 1:
            raise UnsafeArchive(f"expected one top-level entry in the archive, got {len(top)}")
        name = top[0]
        content, kind = os.path.join(staging, name), extracted.kinds[name]
    final = os.path.join(dest, name) if dest_is_dir and name else dest
    if kind != "dir":
        if os.path.isdir(final) and not os.path.islink(final):
            raise LocalIOError(f"cannot overwrite directory {final} with a non-directory")
        os.replace(content, final)
        return
    mtime: int | None
    if not contents:
        st = os.lstat(content)
        mode, mtime = stat.S_IMODE(st.st_mode), st.st_mtime_ns
    elif extracted.root_meta is not None:
        mode, mtime = extracted.root_meta
    else:
        mode, mtime = default_mode, None
    if not os.path.lexists(final):
        # Moving a directory to another parent needs write access to it (its
        # ".." changes); its own mode and mtime are restored afterwards.
        os.chmod(content, 0o700)
        os.rename(content, final)
        os.chmod(final, mode)
        if mtime is not None:
            os.utime(final, ns=(mtime, mtime))
        return
    if not os.path.isdir(final):
        raise LocalIOError(f"cannot overwrite non-directory {final} with a directory")
    _merge(content, final)


def _merge(src: str, dst: str) -> None:
    """Move ``src``'s entries into the existing directory ``dst``; never
    follows a symlink found in ``dst`` (it is replaced, like any file)."""
    os.chmod(src, 0o700)  # entries leave it: it needs to be writable, even if 0o555 in the box
    with os.scandir(src) as entries:
        children = list(entries)
    for entry in children:
        target = os.path.join(dst, entry.name)
        is_dir = entry.is_dir(follow_symlinks=False)
        try:
            target_mode = os.lstat(target).st_mode
        except FileNotFoundError:
            target_mode = None
        if target_mode is not None and stat.S_ISDIR(target_mode):
            if not is_dir:
                raise LocalIOError(f"cannot overwrite directory {target} with a non-directory")
            st = os.lstat(entry.path)
            _merge(entry.path, target)
            os.chmod(target, stat.S_IMODE(st.st_mode))
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
            continue
        if target_mode is not None and is_dir:
            os.unlink(target)
        if is_dir:  # as in _place: a directory changing parent must be writable
            st = os.lstat(entry.path)
            os.chmod(entry.path, 0o700)
            os.rename(entry.path, target)
            os.chmod(target, stat.S_IMODE(st.st_mode))
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        else:
            os.replace(entry.path, target)


@final
class _ChannelWriter:
    """An AsyncWriter for ``download_tar`` into the extractor's channel."""

    def __init__(self, channel: trio.MemorySendChannel[bytes], meter: Meter) -> None:
        self._channel = channel
        self._meter = meter

    async def write(self, data: bytes) -> None:
        try:
            await self._channel.send(data)
        except trio.BrokenResourceError:
            # The extractor stopped; its error (raised in the same nursery)
            # says why, and this task is about to be cancelled.
            await trio.sleep_forever()
        self._meter.add(len(data))


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

    def prepare() -> tuple[bool, str, int]:
        dest_is_dir = os.path.isdir(dest_text)
        if not dest_is_dir and dest_text.endswith("/"):
            raise FileNotFoundError(errno.ENOENT, "No such directory", dest_text)
        base = dest_text if dest_is_dir else os.path.dirname(os.path.abspath(dest_text))
        staging = os.path.join(base, f".boxfiles-{secrets.token_hex(6)}.part")
        # Made with the umask applied, to learn the mode a new directory gets
        # (os.umask() cannot be read without changing it for every thread);
        # then closed to others while it fills.
        os.mkdir(staging, 0o777)
        try:
            default_mode = stat.S_IMODE(os.lstat(staging).st_mode)
            os.chmod(staging, 0o700)
        except BaseException:
            os.rmdir(staging)
            raise
        return dest_is_dir, staging, default_mode

    try:
        dest_is_dir, staging, default_mode = await trio.to_thread.run_sync(prepare)
    except OSError as err:
        # Name dest, not the staging directory the user never asked for.
        raise LocalIOError(f"cannot write {dest_text}: {describe_oserror(err)}") from err
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
            await client.download_tar(
                src_path,
                _ChannelWriter(send_chunks, meter),
                container_id=container_id,
                include_parent=True,
                follow_symlinks=follow_symlinks,
            )

    try:
        await supervise(extract, download)
        assert extracted is not None
        try:
            await trio.to_thread.run_sync(
                lambda: _place(
                    staging,
                    extracted,
                    dest_text,
                    dest_is_dir=dest_is_dir,
                    contents=contents,
                    default_mode=default_mode,
                )
            )
        except OSError as err:
            raise _local_error(err, dest_text, "cannot write") from err
        meter.finish()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_remove_staging, staging)


def _remove_staging(staging: str) -> None:
    """Remove what is left of ``staging`` (all of it after a failure)."""
    if not os.path.lexists(staging):
        return
    # Modes restored from the archive (a 0o500 directory) must not stop the
    # clean-up; os.walk lists a directory only after it is yielded, so
    # opening each one up on the way down is enough.
    for parent, subdirs, _files in os.walk(staging):
        for name in subdirs:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                with contextlib.suppress(OSError):  # rmtree reports what stays
                    os.chmod(path, 0o700)
    shutil.rmtree(staging, ignore_errors=True)

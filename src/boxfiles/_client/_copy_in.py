"""copy_in: a local file or tree into a box, as tar packed on the fly.

The source is packed in a worker thread straight into the upload's pooled
chunk buffers, handed over a trio channel to the upload_tar transfer: no
temporary tar file, no whole-tree buffering, no copies but the kernel's
(``boxfiles._chunks``, which the reference server's packer uses too).
"""

from __future__ import annotations

import dataclasses
import errno
import grp
import os
import pwd
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import final

import trio

from .._chunks import ChunkSink, TransferBuffers
from .._errors import FailedPrecondition, LocalIOError
from .._supervise import supervise
from .._tar._write import END, RECORD, HardLinks, header, member, padding
from .._wire import (
    Chunk,
    check_chunk_size,
    check_container_id,
    check_path,
    first_upload_chunk,
)
from ._local import ChunkReader, local_error, local_path
from ._progress import Meter, Progress, check_progress
from ._transfer import Calls


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
    path: str, arcname: str, st: os.stat_result, names: _Names, links: HardLinks
) -> tarfile.TarInfo | None:
    """The header for one entry; None for a socket (skipped, like GNU tar)."""
    info = member(arcname, st, links, lambda: os.readlink(path))
    if info is None:
        if stat.S_ISSOCK(st.st_mode):
            return None
        kind = "fifo" if stat.S_ISFIFO(st.st_mode) else "device node"
        raise LocalIOError(f"cannot copy {path}: it is a {kind}")
    if info.type == tarfile.REGTYPE:
        links.packed(st, arcname)
    info.uname, info.gname = names.user(st.st_uid), names.group(st.st_gid)
    return info


def archive_size(plan: _PackPlan) -> int:
    """The exact size of the archive :func:`_pack` will produce for ``plan``
    if the tree does not change meanwhile (stats and headers only)."""
    names, links = _Names(), HardLinks()
    total = 0
    for path, arcname, st in _walk(plan):
        info = _tarinfo(path, arcname, st, names, links)
        if info is None:
            continue
        total += len(header(info))
        if info.type == tarfile.REGTYPE:
            total += info.size + padding(info.size)
    total += len(END)
    return total + padding(total, RECORD)


def _pack(plan: _PackPlan, sink: ChunkSink) -> None:
    """Write the whole archive into ``sink`` (blocking; a worker thread)."""
    names, links = _Names(), HardLinks()
    zeros = bytes(RECORD)
    total = 0
    for path, arcname, st in _walk(plan):
        info = _tarinfo(path, arcname, st, names, links)
        if info is None:
            continue
        block = header(info)
        sink.write(block)
        total += len(block)
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
            if sink.copy_from(fd, info.size) < info.size:
                # Failed, not padded with zeros, on both sides (the server's
                # download answers ABORTED): padding would pass off a corrupt
                # file as whole. The upload is reset before anything is placed.
                raise LocalIOError(f"cannot read {path}: it shrank while being copied")
        finally:
            os.close(fd)
        pad = padding(info.size)
        sink.write(zeros[:pad])
        total += info.size + pad
    sink.write(END)
    total += len(END)
    sink.write(zeros[: padding(total, RECORD)])
    sink.flush()


async def copy_in(
    calls: Calls,
    src: str | os.PathLike[str],
    dest_path: str,
    *,
    container_id: str | None,
    follow_symlinks: bool,
    mkdir_parents: bool,
    overwrite: bool,
    chunk_size: int,
    progress: Progress | None,
) -> None:
    """See :meth:`FilesClient.copy_in`."""
    check_chunk_size(chunk_size)
    check_path(dest_path, "dest_path")
    container = check_container_id(container_id)
    check_progress(progress)
    src_text = local_path(src, "src")
    try:
        plan = await trio.to_thread.run_sync(_plan, src_text, follow_symlinks)
    except OSError as err:
        raise local_error(err, src_text) from err
    name = os.path.basename(plan.path)
    if plan.is_dir:
        # docker cp: a directory copied onto an existing directory lands
        # inside it under its own name; anywhere else it becomes dest_path,
        # but never replaces a file (overwrite is for a file by a file).
        kind = await calls.remote_kind(dest_path, container_id=container_id)
        if kind == "file":
            raise FailedPrecondition(f"cannot overwrite non-directory {dest_path} with a directory")
        if kind == "dir" and not src_text.endswith("/.") and name:
            plan = dataclasses.replace(plan, root=name)
    try:
        total = await trio.to_thread.run_sync(archive_size, plan) if progress else None
    except OSError as err:
        raise local_error(err, src_text) from err
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

    buffers = TransferBuffers(calls.buffers, chunk_size)

    async def pack() -> None:
        try:
            sink = ChunkSink(send_chunks.send, buffers, chunk_size)
            await trio.to_thread.run_sync(_pack, plan, sink)
        except OSError as err:
            raise local_error(err, src_text) from err
        # Closing is the only end-of-data signal (see _client._upload.read).
        await send_chunks.aclose()

    async def upload() -> None:
        async with receive_chunks:
            await calls.upload(ChunkReader(read, chunk_size), first)

    try:
        await supervise(pack, upload)
    finally:
        buffers.close()

"""Download, server side: pack a tree into a tar stream on the fly.

Blocking; runs in a worker thread and fills the download's chunk buffers as
it goes (a :class:`boxfiles._chunks.ChunkSink`: file data is read straight
into them), so the first chunk leaves before the tree has been read and a
slow client stalls the packing rather than filling memory. Every file is
opened from its directory's fd with O_NOFOLLOW, never by path.
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass
from typing import final

from .._chunks import ChunkSink
from .._errors import Internal, NotFound, Status
from .._fs import DIR_FLAGS, TreeWalk
from .._tar._write import END, HardLinks, header, member, padding
from ._confine import STAGING_PREFIX, Located, components, locate

#: Most entries :func:`measure` walks for a download's size hint; a larger
#: tree gets no hint rather than a second long walk before its first byte.
MEASURE_ENTRIES = 10_000


@final
@dataclass
class PackPlan:
    """What a download packs: ``source`` under the name ``arcname``."""

    source: Located
    arcname: str
    source_is_dir: bool


def plan(root_fd: int, src_path: str, *, include_parent: bool, follow_symlinks: bool) -> PackPlan:
    """Resolve ``src_path`` inside the root (see :func:`boxfiles._server._confine.locate`).

    A trailing ``/.`` packs a directory's contents at ``./``; so does a
    directory with ``include_parent`` false. ``follow_symlinks`` applies to
    the source itself (as ``docker cp -L``); links inside a directory are
    packed as links.

    Raises:
        NotFound: the source does not exist, or ``/.`` follows a non-directory.
    """
    contents = src_path.endswith("/.")
    path = src_path[:-2] if contents else src_path
    parts = components(path)
    try:
        source = locate(root_fd, path, follow=follow_symlinks or contents or path.endswith("/"))
    except NotFound as err:
        raise NotFound(f"source path does not exist: {src_path} ({err.message})") from err
    try:
        st = source.lstat()
        if st is None:
            raise NotFound(f"source path does not exist: {src_path}")
        is_dir = stat.S_ISDIR(st.st_mode)
        if contents and not is_dir:
            raise NotFound(f"not a directory: {path}")
    except BaseException:
        source.close()
        raise
    if is_dir and (contents or not include_parent):
        arcname = "."
    else:
        arcname = parts[-1] if parts and parts[-1] != ".." else "."
    return PackPlan(source, arcname, is_dir)


@final
class _Counter:
    """A sink that only counts what would be written."""

    def __init__(self, entries: int) -> None:
        self.size = 0
        self.entries_left = entries

    def write(self, data: bytes) -> None:
        self.size += len(data)


class _TooMany(Exception):
    pass


@final
class _Packer:
    """Writes a tree as tar to a ChunkSink, or (to a _Counter) measures the
    archive it would write: the same headers, file sizes from the walk."""

    def __init__(self, sink: ChunkSink | _Counter) -> None:
        self._sink = sink
        self._links = HardLinks()

    def _header(self, info: tarfile.TarInfo) -> None:
        self._sink.write(header(info))

    def tree(self, dir_fd: int, name: str, arcname: str) -> None:
        """Pack ``name`` in ``dir_fd`` ("" for ``dir_fd`` itself) and, for a
        directory, everything under it, walked without recursion."""
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False) if name else os.fstat(dir_fd)
        self._entry(dir_fd, name, st, arcname)
        if not stat.S_ISDIR(st.st_mode):
            return
        top = os.open(name, DIR_FLAGS, dir_fd=dir_fd) if name else os.dup(dir_fd)
        try:
            walk = TreeWalk(top, ordered=True)
        finally:
            os.close(top)
        try:
            for child, child_st, leaving in walk:
                # Staging is an upload in progress (or a dead server's
                # debris), not content; the name is reserved, so nothing
                # else can bear it.
                if leaving or child.startswith(STAGING_PREFIX):
                    continue
                self._entry(walk.fd, child, child_st, "/".join([arcname, *walk.path, child]))
                if stat.S_ISDIR(child_st.st_mode):
                    walk.descend(child)
        finally:
            walk.close()

    def _entry(self, dir_fd: int, name: str, st: os.stat_result, arcname: str) -> None:
        if isinstance(self._sink, _Counter):
            self._sink.entries_left -= 1
            if self._sink.entries_left < 0:
                raise _TooMany
        # Sockets, fifos and devices are skipped (see member: copy_in refuses them).
        info = member(arcname, st, self._links, lambda: os.readlink(name, dir_fd=dir_fd))
        if info is None:
            return
        if info.type != tarfile.REGTYPE:
            self._header(info)
            return
        if isinstance(self._sink, _Counter):
            # A hint: the walk's stat is size enough, without opening the file.
            self._header(info)
            self._sink.size += st.st_size + padding(st.st_size)
            self._links.packed(st, arcname)
            return
        if self._file(self._sink, dir_fd, name, info):
            self._links.packed(st, arcname)

    def _file(self, sink: ChunkSink, dir_fd: int, name: str, info: tarfile.TarInfo) -> bool:
        """Pack a regular file's header and data; False if it is no longer one."""
        # O_NONBLOCK: if a fifo took the file's place since the stat, the open
        # must not hang; the fstat below then skips it.
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return False
            info.size = st.st_size
            self._header(info)
            if sink.copy_from(fd, st.st_size) < st.st_size:
                # Fail the download rather than pad it with zeros, as the
                # client's copy_in fails an upload: the client then keeps
                # nothing of it.
                raise Internal(f"{info.name} shrank while being read", status=Status.ABORTED)
            sink.write(END[: padding(st.st_size)])
        finally:
            os.close(fd)
        return True


def measure(plan: PackPlan) -> int | None:
    """The size of the archive :func:`pack` would write for ``plan`` now, or
    None past MEASURE_ENTRIES entries. A hint only: the tree may change
    before it is packed.

    Raises:
        OSError: reading the tree failed.
    """
    counter = _Counter(MEASURE_ENTRIES)
    try:
        _Packer(counter).tree(plan.source.dir_fd, plan.source.name, plan.arcname)
    except _TooMany:
        return None
    return counter.size + len(END)


def pack(plan: PackPlan, sink: ChunkSink) -> None:
    """Write ``plan``'s source to ``sink`` as a tar archive (PAX format).

    Upload staging (entries named STAGING_PREFIX..., wherever they are) is
    left out.

    Raises:
        OSError: reading the tree failed.
        Internal: ABORTED, a file shrank while being read.
        trio.Cancelled, trio.BrokenResourceError: from the sink.
    """
    _Packer(sink).tree(plan.source.dir_fd, plan.source.name, plan.arcname)
    sink.write(END)
    sink.flush()

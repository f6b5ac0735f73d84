"""The public client: open_client() and FilesClient, a facade over the
calls in :mod:`._transfer` and the copies in :mod:`._copy_in` and :mod:`._copy_out`."""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import final

from .._aio import open_channel
from .._api import NoPublicConstructor
from .._target import parse_target
from .._wire import (
    DEFAULT_CHUNK_SIZE,
    check_chunk_size,
    check_container_id,
    check_path,
    first_upload_chunk,
)
from . import _copy_in, _copy_out
from ._local import Destination, Source, open_source
from ._progress import Meter, Progress, check_progress, metered_reader
from ._transfer import Calls


@final
class FilesClient(metaclass=NoPublicConstructor):
    """A connection to a ``boxlite.v1.Files`` server. Made by :func:`open_client`.

    Calls may run concurrently from several tasks; each is one HTTP/2 stream
    on the shared connection. Concurrent file uploads share a bounded pool
    of chunk buffers: each holds one of its own and at most POOL_SIZE in
    all, and together they hold at most CLIENT_POOL_SIZE more, so memory
    grows by one chunk per upload, not six.
    """

    _made_by = "boxfiles.open_client()"

    def __init__(self, calls: Calls) -> None:
        self._calls = calls

    async def upload_tar(
        self,
        source: Source,
        dest_path: str,
        *,
        container_id: str | None = None,
        mkdir_parents: bool = True,
        overwrite: bool = True,
        source_is_dir: bool | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: Progress | None = None,
    ) -> None:
        """Stream a tar archive to the server, to be extracted at ``dest_path``.

        Memory stays at about ``chunk_size * (CHANNEL_CAPACITY + 3)`` whatever
        the archive's size.

        Args:
            source: a path to a tar file, or any object with
                ``async def read(max_bytes) -> bytes`` returning ``b""`` at
                the end (a ``trio.open_file`` object qualifies).
            dest_path: where the server extracts the archive.
            container_id: which container; None picks the server's only one.
            mkdir_parents: create missing parent directories of dest_path.
            overwrite: replace what already exists at the destination.
            source_is_dir: tells the server the archive holds a directory
                (True) or a single file (False); None lets it decide.
            chunk_size: bytes of data per message (1 to MAX_CHUNK_SIZE).
            progress: called as ``progress(bytes_sent, total)`` at most five
                times a second and once at the end; ``total`` is a path
                source's size, None for a reader.

        Raises:
            LocalIOError: the source could not be opened or read (the root
                cause wins over the failure it provokes on the stream; the
                stream is reset, never ended, so the server never takes a
                truncated archive for a whole one).
            UploadRejected: the server answered ``success=false``.
            RemoteError: the server failed the call with a status (its
                subclass names the status); also Unavailable when the server
                cannot be reached and DeadlineExceeded past the client's
                ``timeout``.
            IncompleteTransfer: the stream ended with no status to say why.
            TypeError, ValueError: an argument is of the wrong type or value;
                nothing was sent.

        On cancellation the reader and the sender stop at once, the stream
        is reset (the server sees RST_STREAM promptly, not at disconnect),
        and trio.Cancelled propagates. A deadline behaves the same: the
        caller's own ``fail_after`` raises trio.TooSlowError, the client's
        ``timeout`` raises DeadlineExceeded.
        """
        first = first_upload_chunk(
            check_path(dest_path, "dest_path"),
            check_container_id(container_id),
            mkdir_parents=mkdir_parents,
            overwrite=overwrite,
            source_is_dir=source_is_dir,
        )
        check_chunk_size(chunk_size)
        check_progress(progress)
        with self._calls.deadline():
            async with open_source(source, chunk_size, self._calls.buffers) as reader:
                await self._calls.upload(await metered_reader(reader, progress, source), first)

    async def download_tar(
        self,
        src_path: str,
        dest: Destination,
        *,
        container_id: str | None = None,
        include_parent: bool = True,
        follow_symlinks: bool = False,
        progress: Progress | None = None,
    ) -> bool | None:
        """Stream ``src_path`` from the server as a tar archive into ``dest``.

        Args:
            src_path: the file or directory to pack; a trailing ``/.`` packs
                a directory's contents.
            dest: a path to write the archive to, or any object with
                ``async def write(data)``. A path is written to a hidden
                temporary file beside it and renamed into place only when
                the whole archive arrived and the server reported OK.
            container_id: which container; None picks the server's only one.
            include_parent: root a directory's archive at ``name/`` (True)
                or at ``./`` (False).
            follow_symlinks: pack what symlinks point to, not the links.
            progress: called as ``progress(bytes_received, total)`` at most
                five times a second and once at the end; ``total`` is the
                archive size the server announced (``boxfiles-size``
                metadata), None when it sent none.

        Returns:
            The ``source_is_dir`` flag the server sent on its first chunk, or
            None when it sent none.

        Raises:
            LocalIOError: the destination could not be written.
            RemoteError: the server failed the call (NotFound for a missing
                source, and so on); Unavailable, DeadlineExceeded as above.
            IncompleteTransfer: the stream ended with no status to say why.
            TypeError, ValueError: an argument is of the wrong type or value.

        On failure or cancellation a path ``dest`` is left as it was (absent,
        or its previous content), the stream is reset, and the error (or
        trio.Cancelled) propagates. A deadline behaves the same: the caller's
        own ``fail_after`` raises trio.TooSlowError, the client's ``timeout``
        raises DeadlineExceeded.
        """
        meter = Meter(check_progress(progress), None)
        source_is_dir = await self._calls.download(
            src_path,
            dest,
            meter,
            container_id=container_id,
            include_parent=include_parent,
            follow_symlinks=follow_symlinks,
        )
        meter.finish()
        return source_is_dir

    async def copy_in(
        self,
        src: str | os.PathLike[str],
        dest_path: str,
        *,
        container_id: str | None = None,
        follow_symlinks: bool = False,
        mkdir_parents: bool = True,
        overwrite: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: Progress | None = None,
    ) -> None:
        """Copy a local file or directory into the box at ``dest_path``.

        The tar archive is built by a worker thread while it streams (no
        temporary file, memory bounded by a few chunks whatever the tree's
        size), and ``source_is_dir`` is always sent. Where things land
        follows ``docker cp``: a directory onto an existing directory lands
        inside it under its own name, anywhere else it becomes ``dest_path``
        (created when ``mkdir_parents`` allows); ``src/.`` copies a
        directory's contents into ``dest_path`` either way. Telling the two
        cases apart costs one extra call that reads the first chunk of
        ``dest_path`` and resets (a server that refuses it gets the
        contents into ``dest_path``). A file becomes ``dest_path``, or lands
        inside it by its basename when it is an existing directory or ends
        with ``/``. A directory onto an existing non-directory raises
        FailedPrecondition, nothing sent. Sockets in the tree are skipped; a
        fifo or device node fails the copy, naming it.

        Args:
            src: the local file or directory (or symlink).
            dest_path: where in the box.
            container_id: which container; None picks the server's only one.
            follow_symlinks: when ``src`` itself is a symlink, copy what it
                points to (like ``docker cp -L``); links inside a directory
                are always copied as links.
            mkdir_parents: create missing parent directories of dest_path.
            overwrite: replace what already exists at the destination.
            chunk_size: bytes of data per message (1 to MAX_CHUNK_SIZE).
            progress: called as ``progress(bytes_sent, total)`` at most five
                times a second and once at the end. Passing it costs a
                pre-walk of the tree (one lstat per entry, no file read --
                about what ``du`` costs) that makes ``total`` the exact
                archive size, unless files change meanwhile.

        Raises:
            LocalIOError: ``src`` is missing or unreadable, or holds a fifo
                or device node.
            FailedPrecondition: a directory onto an existing non-directory.
            UploadRejected, RemoteError, IncompleteTransfer: as for
                :meth:`upload_tar`, with the same priority rules (a local
                failure wins and the stream is reset, never ended).
            TypeError, ValueError: an argument is of the wrong type or value.

        On cancellation or past the client's ``timeout`` the stream is reset
        at once and trio.Cancelled (or DeadlineExceeded) propagates; the
        packing thread stops at its next chunk (a blocking read of one local
        file cannot be interrupted).
        """
        with self._calls.deadline():
            await _copy_in.copy_in(
                self._calls,
                src,
                dest_path,
                container_id=container_id,
                follow_symlinks=follow_symlinks,
                mkdir_parents=mkdir_parents,
                overwrite=overwrite,
                chunk_size=chunk_size,
                progress=progress,
            )

    async def copy_out(
        self,
        src_path: str,
        dest: str | os.PathLike[str],
        *,
        container_id: str | None = None,
        follow_symlinks: bool = False,
        progress: Progress | None = None,
    ) -> None:
        """Copy ``src_path`` out of the box to the local path ``dest``.

        The archive is unpacked while it streams, by a worker thread, into a
        hidden staging directory beside the destination; only when it is
        complete, sound, and the server reported OK is the result moved into
        place, following ``docker cp``: a directory ``src_path`` lands
        inside ``dest`` by its name when ``dest`` is an existing directory,
        else becomes ``dest``; ``dir/.`` merges the directory's contents
        into ``dest`` (created when missing); a file becomes ``dest`` or
        lands inside it when it is a directory. ``dest`` itself is resolved
        as given (a symlink to a directory is that directory); nothing below
        it is followed: a symlink found where an entry goes, at any depth of
        a merge, is replaced like a file. A directory never replaces a
        non-directory, nor a file a directory. A placement that fails part
        way is undone, leaving ``dest`` as it was.

        Extraction never writes outside the staging directory: entries with
        absolute names or ``..``, hard links to anything not earlier in the
        archive, an entry under a symlink (or file) of the archive, device
        nodes and fifos raise UnsafeArchive. Symlink entries are recreated
        verbatim, absolute targets included, and never followed; a later
        entry replaces an earlier one of the same name, as tar does. The
        top-level entry must be named as ``src_path``. File and directory
        permission bits (and sticky, not setuid/setgid) and mtimes to the
        nanosecond are restored; ownership is not.

        Args:
            src_path: the file or directory in the box; a trailing ``/.``
                means a directory's contents.
            dest: the local destination.
            container_id: which container; None picks the server's only one.
            follow_symlinks: ask the server to pack what symlinks point to.
            progress: called as ``progress(bytes_received, total)`` at most
                five times a second and once at the end; ``total`` is the
                archive size the server announced (``boxfiles-size``
                metadata), None when it sent none.

        Raises:
            UnsafeArchive: the server sent a hostile or corrupt archive.
            LocalIOError: the destination cannot be written (its parent is
                missing, a directory would replace a file, ...).
            RemoteError: the server failed the call (NotFound for a missing
                source, ...); Unavailable, DeadlineExceeded as usual.
            IncompleteTransfer: the stream or the archive ended early.
            TypeError, ValueError: an argument is of the wrong type or value.

        On any failure, cancellation or deadline the stream is reset, the
        staging directory is removed and the local filesystem is left as it
        was; the error (or trio.Cancelled) propagates. Only the final move
        into an existing directory is not atomic: a failure there (rare, a
        permission error say) can leave part of the tree merged.
        """
        with self._calls.deadline():
            await _copy_out.copy_out(
                self._calls,
                src_path,
                dest,
                container_id=container_id,
                follow_symlinks=follow_symlinks,
                progress=progress,
            )


@asynccontextmanager
async def open_client(
    target: str | os.PathLike[str],
    *,
    timeout: float | None = None,
) -> AsyncIterator[FilesClient]:
    """Connect to a Files server; the connection closes when the block ends.

    Args:
        target: ``unix:///abs/path.sock``, ``unix:relative/or/abs.sock``,
            ``tcp://host:port`` or ``host:port``. Over a unix socket the
            ``:authority`` sent is ``localhost``, as real peers expect.
        timeout: seconds each call may take, or None for no limit. A call
            that runs over raises DeadlineExceeded; the deadline is also sent
            to the server (``grpc-timeout``).

    The connection is made lazily by the first call; an unreachable server
    shows as :class:`Unavailable` from that call. No task outlives the block:
    leaving it closes the connection and resets calls still in flight.

    Raises:
        ValueError: ``target`` or ``timeout`` is malformed.
    """
    parsed = parse_target(target)
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    if timeout is not None and math.isinf(timeout):
        timeout = None
    async with open_channel(parsed) as channel:
        yield FilesClient._create(Calls(channel, timeout))

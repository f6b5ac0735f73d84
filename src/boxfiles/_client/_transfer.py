"""The client's calls: each transfer is one nursery running the local side
(a reader or a writer) and the gRPC side, joined by a memory channel of
CHANNEL_CAPACITY chunks. The nursery's cancel scope aborts the healthy side
when the other fails, and :func:`boxfiles._supervise.supervise` raises the
one error the caller sees.

:class:`Calls` is what :class:`FilesClient`, copy_in and copy_out share: the
channel, the client's deadline and its buffer pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, final

import trio

from .._aio import Channel, ClientCall
from .._chunks import BufferPool
from .._errors import DeadlineExceeded, IncompleteTransfer, NotFound, RemoteError, UploadRejected
from .._proto.files_pb2 import DownloadChunk, DownloadRequest, UploadChunk, UploadResponse
from .._supervise import supervise
from .._wire import (
    ARRIVED_PER_TURN,
    CHANNEL_CAPACITY,
    DOWNLOAD,
    UPLOAD,
    Chunk,
    check_container_id,
    check_path,
    decode_download_chunk,
    encode_metadata_only,
    size_hint,
)
from ._local import (
    CLIENT_POOL_SIZE,
    WRITE_BATCH_BYTES,
    ChunkReader,
    ChunkWriter,
    Destination,
    open_destination,
)
from ._progress import Meter, metered_writer

#: What a path in the box is, as copy_in's destination probe learns it.
RemoteKind = Literal["dir", "file", "missing", "unknown"]


@final
class Calls:
    """The calls of one client, on its channel, under its deadline.

    Uploads share the client's bounded pool of chunk buffers: each holds
    one of its own and at most POOL_SIZE in all, and together they hold at
    most CLIENT_POOL_SIZE more.
    """

    def __init__(self, channel: Channel, timeout: float | None) -> None:
        self.channel = channel
        self.timeout = timeout
        self.buffers = BufferPool(CLIENT_POOL_SIZE)

    @contextmanager
    def deadline(self) -> Iterator[None]:
        if self.timeout is None:
            yield
            return
        try:
            with trio.fail_after(self.timeout):
                yield
        except trio.TooSlowError as exc:
            raise DeadlineExceeded(
                f"call took longer than the client timeout of {self.timeout}s"
            ) from exc

    async def upload(self, reader: ChunkReader, first: UploadChunk) -> None:
        """upload_tar's transfer, from any chunk reader (copy_in's packer too);
        its errors and cancellation as upload_tar's, but no client deadline."""
        async with self.channel.open_call(UPLOAD, grpc_timeout=self.timeout) as call:
            await _upload(call, reader, first)

    async def download(
        self,
        src_path: str,
        dest: Destination | ChunkWriter,
        meter: Meter,
        *,
        container_id: str | None,
        include_parent: bool,
        follow_symlinks: bool,
    ) -> bool | None:
        """download_tar's transfer, counting into ``meter`` (copy_out's too)
        and giving it the server's size hint as its total; no final report."""
        request = DownloadRequest(
            src_path=check_path(src_path, "src_path"),
            container_id=check_container_id(container_id),
            include_parent=bool(include_parent),
            follow_symlinks=bool(follow_symlinks),
        )
        with self.deadline():
            async with open_destination(dest) as writer:
                async with self.channel.open_call(DOWNLOAD, grpc_timeout=self.timeout) as call:
                    return await _download(call, request, metered_writer(writer, meter), meter)

    async def remote_kind(self, path: str, *, container_id: str | None) -> RemoteKind:
        """What ``path`` is in the box, learnt from the first chunk of a
        download that is then reset. A peek: the server gets at most
        PEEK_WINDOW bytes past that chunk onto the wire (the reference
        server's first chunk carries no data, so it packs at most one
        chunk). "unknown" when the server does not say (a legacy peer, or
        one that refuses the download)."""
        # Followed, as the server resolves an upload's dest_path.
        request = DownloadRequest(
            src_path=path, container_id=check_container_id(container_id), follow_symlinks=True
        )
        kind: RemoteKind = "missing"
        with self.deadline(), trio.CancelScope() as done:
            try:
                async with self.channel.open_call(
                    DOWNLOAD, grpc_timeout=self.timeout, peek=True
                ) as call:
                    await call.send(request, end=True)
                    body = await call.recv_pieces()
                    if body is not None:
                        try:
                            is_dir = decode_download_chunk(body)[1]
                        except ValueError as err:
                            raise IncompleteTransfer(f"malformed DownloadChunk: {err}") from err
                        kind = "unknown" if is_dir is None else "dir" if is_dir else "file"
                    # Leaving by cancellation resets the stream: the rest of
                    # the archive is not wanted.
                    done.cancel()
                    await trio.lowlevel.checkpoint()
            except NotFound:
                kind = "missing"
            except RemoteError:
                kind = "unknown"  # a server that will not say (refuses downloads, say)
        return kind


async def _upload(
    call: ClientCall[UploadChunk, UploadResponse], reader: ChunkReader, first: UploadChunk
) -> None:
    send_chunks, receive_chunks = trio.open_memory_channel[Chunk](CHANNEL_CAPACITY)
    all_sent = trio.Event()

    async def read() -> None:
        while (chunk := await reader.read_chunk()).size:
            try:
                # Queued without a checkpoint while there is room, so the
                # sender takes a batch per turn (one crossing into asyncio,
                # one system call), not a chunk. The channel holds
                # CHANNEL_CAPACITY chunks: a checkpoint comes every few.
                send_chunks.send_nowait(chunk)
            except trio.WouldBlock:
                try:
                    await send_chunks.send(chunk)
                except trio.BrokenResourceError:
                    return  # the sender failed; its error explains why
            except trio.BrokenResourceError:
                return
        # Closing is the only end-of-data signal: a failed reader leaves the
        # channel open, so the sender is cancelled rather than ending the
        # stream as if the archive were complete.
        send_chunks.close()

    async def send() -> None:
        pending: UploadChunk | None = first
        async with receive_chunks:
            async for chunk in receive_chunks:
                # Whatever else is already queued goes in the same crossing
                # into asyncio, which costs more than a chunk's copying.
                batch = [chunk]
                while len(batch) < CHANNEL_CAPACITY:
                    try:
                        batch.append(receive_chunks.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                # The metadata rides on the first chunk only.
                pieces = [
                    piece
                    for i, c in enumerate(batch)
                    for piece in c.framed(pending if i == 0 else None)
                ]
                await call.send_encoded(*pieces)
                for sent in batch:
                    sent.release()
                pending = None
        if pending is not None:  # empty source: one chunk, metadata only
            await call.send_encoded(encode_metadata_only(pending))
        await call.end()
        all_sent.set()

    async def receive() -> None:
        # Listening from the start means a status the server sends early
        # (a rejection after the first chunk, say) aborts the transfer at
        # once, even while the reader is stalled.
        response = await call.recv()
        if response is None:
            call.raise_for_status()
            raise IncompleteTransfer("the server ended the upload without a response")
        if not response.success:
            raise UploadRejected(response.error or "upload failed")
        await call.finish()
        if not all_sent.is_set():
            # A complete OK answer before the request was: the server has all
            # it wants (RFC 9113 §8.1), and what is left unread is moot.
            answered.cancel()

    with trio.CancelScope() as answered:
        await supervise(read, send, receive)


async def _download(
    call: ClientCall[DownloadRequest, DownloadChunk],
    request: DownloadRequest,
    writer: ChunkWriter,
    meter: Meter,
) -> bool | None:
    # A message's data as the views of the frames it came in: written from
    # them, never joined.
    send_chunks, receive_chunks = trio.open_memory_channel[list[memoryview]](CHANNEL_CAPACITY)
    source_is_dir: bool | None = None

    async def hand_on(batch: list[memoryview]) -> bool:
        """Queue ``batch`` for the writer (a checkpoint: the writer starts on
        it at once); False if the writer failed."""
        try:
            await send_chunks.send(batch)
        except trio.BrokenResourceError:
            return False  # the writer failed; its error explains why
        return True

    async def receive() -> None:
        nonlocal source_is_dir
        await call.send(request, end=True)
        first = True
        # Messages that have arrived whole are taken without a checkpoint,
        # up to ARRIVED_PER_TURN, and their data handed on in batches of up
        # to WRITE_BATCH_BYTES: small messages then cost the writer a
        # wake-up (and a thread hop) per batch, not each.
        batch: list[memoryview] = []
        batch_size = taken = 0
        while True:
            body = call.recv_arrived() if taken < ARRIVED_PER_TURN else None
            if body is None:
                if batch and not await hand_on(batch):
                    return
                batch, batch_size, taken = [], 0, 0
                if (body := await call.recv_pieces()) is None:
                    break
            taken += 1
            try:
                data, flag = decode_download_chunk(body)
            except ValueError as err:
                raise IncompleteTransfer(f"malformed DownloadChunk from the server: {err}") from err
            if first:
                first = False
                source_is_dir = flag
                # Headers come before the first message, so the hint is known now.
                meter.total = size_hint(call.initial_metadata())
            size = sum(map(len, data))
            if batch and batch_size + size > WRITE_BATCH_BYTES:
                # A batch stays within WRITE_BATCH_BYTES (or one message):
                # what the channel holds is bounded as with one message each.
                if not await hand_on(batch):
                    return
                batch, batch_size, taken = [], 0, 0
            batch += data
            batch_size += size
        await call.finish()
        send_chunks.close()  # only after an OK status: see _upload.read

    async def write() -> None:
        async with receive_chunks:
            async for data in receive_chunks:
                # Small chunks already queued go in the same write: see
                # WRITE_BATCH_BYTES.
                batch = data
                size = sum(map(len, data))
                while size < WRITE_BATCH_BYTES:
                    try:
                        data = receive_chunks.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    batch += data
                    size += sum(map(len, data))
                await writer.write(batch)

    await supervise(receive, write)
    return source_is_dir

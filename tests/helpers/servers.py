"""Servers for a test to talk to: the reference server, a scripted one (see scripted), grpcio's, and the client calls most tests make of them."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

import boxfiles
from boxfiles._aio import ServerCall
from boxfiles._proto.files_pb2 import DownloadChunk, DownloadRequest
from boxfiles._supervise import one_error

from .archives import BytesReader
from .grpcio_sink import DownloadFn, UploadFn, start_grpcio_server
from .trees import listing, no_staging, times


@asynccontextmanager
async def serving(
    root: Path | Mapping[str, Path], sock_dir: Path, **options: object
) -> AsyncIterator[str]:
    with one_error():  # so a test's pytest.raises sees the error itself
        async with trio.open_nursery() as nursery:
            target: str = await nursery.start(
                lambda task_status: boxfiles.serve_files(
                    root,
                    f"unix:{sock_dir}/s.sock",
                    task_status=task_status,
                    **options,  # type: ignore[arg-type]
                )
            )
            yield target
            nursery.cancel_scope.cancel()


async def upload(target: str, data: bytes, dest: str, **options: object) -> None:
    async with boxfiles.open_client(target) as client:
        await client.upload_tar(BytesReader(data), dest, **options)  # type: ignore[arg-type]


async def download(target: str, src: str, **options: object) -> tuple[bytes | None, bool | None]:
    """The archive and source_is_dir; the archive is None when nothing arrived."""
    sink = io.BytesIO()

    class Writer:
        async def write(self, data: bytes) -> None:
            sink.write(data)

    async with boxfiles.open_client(target) as client:
        is_dir = await client.download_tar(src, Writer(), **options)  # type: ignore[arg-type]
    return sink.getvalue(), is_dir


async def expect_unchanged(
    root: Path,
    error: type[boxfiles.FilesError],
    match: str,
    target: str,
    data: bytes,
    dest: str,
    **options: object,
) -> boxfiles.FilesError:
    """Upload, expect ``error`` whose message matches, and no change under
    root: contents, modes and mtimes."""
    before, before_times = listing(root), times(root)
    with pytest.raises(error, match=match) as info:
        await upload(target, data, dest, **options)
    assert listing(root) == before
    assert times(root) == before_times
    assert no_staging(root)
    return info.value


def serve_bytes(
    data: bytes,
    *,
    source_is_dir: bool = True,
    chunk: int = 64 * 1024,
    then: BaseException | None = None,
) -> Callable[[ServerCall[DownloadRequest, DownloadChunk]], object]:
    async def script(call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        await call.recv()
        for i in range(0, len(data), chunk):
            message = DownloadChunk(data=data[i : i + chunk])
            if i == 0:
                message.source_is_dir = source_is_dir
            await call.send(message)
        if then is not None:
            raise then

    return script


@contextmanager
def grpcio_server(path: Path, upload: UploadFn, download: DownloadFn) -> Iterator[str]:
    server = start_grpcio_server(f"unix:{path}", upload, download)
    try:
        yield f"unix:{path}"
    finally:
        server.stop(grace=None).wait()


def no_download(request: DownloadRequest, context: Any) -> Iterator[DownloadChunk]:
    context.abort(grpc.StatusCode.UNIMPLEMENTED, "no downloads here")
    yield DownloadChunk()  # unreachable: abort raises

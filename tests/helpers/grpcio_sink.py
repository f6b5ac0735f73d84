"""A grpcio (C-core) Files sink, run as a separate process so that its
allocations stay out of the measuring process: ``python -m tests.helpers.grpcio_sink SOCKET``.

It counts upload bytes and answers success; it prints "ready" once listening
and stops when its stdin closes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from boxfiles._proto.files_pb2 import DownloadChunk, DownloadRequest, UploadChunk, UploadResponse


def upload(chunks: Iterator[UploadChunk], context: Any) -> UploadResponse:
    total = sum(len(chunk.data) for chunk in chunks)
    return UploadResponse(success=True, error=str(total))


def download(request: DownloadRequest, context: Any) -> Iterator[DownloadChunk]:
    context.abort(grpc.StatusCode.UNIMPLEMENTED, "sink only")
    yield DownloadChunk()


UploadFn = Callable[[Iterator[UploadChunk], Any], UploadResponse]
DownloadFn = Callable[[DownloadRequest, Any], Iterator[DownloadChunk]]


def start_grpcio_server(
    address: str, upload: UploadFn, download: DownloadFn, *, workers: int = 4
) -> grpc.Server:
    """A started grpcio server for the Files service at ``address``
    (``unix:PATH``), with generic handlers: no generated grpcio code needed."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[("grpc.max_receive_message_length", 8 * 1024 * 1024)],
    )
    handler = grpc.method_handlers_generic_handler(
        "boxlite.v1.Files",
        {
            "Upload": grpc.stream_unary_rpc_method_handler(
                upload,
                request_deserializer=UploadChunk.FromString,
                response_serializer=UploadResponse.SerializeToString,
            ),
            "Download": grpc.unary_stream_rpc_method_handler(
                download,
                request_deserializer=DownloadRequest.FromString,
                response_serializer=DownloadChunk.SerializeToString,
            ),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(address)
    server.start()
    return server


def main() -> None:
    server = start_grpcio_server(f"unix:{sys.argv[1]}", upload, download, workers=2)
    print("ready", flush=True)
    sys.stdin.read()
    server.stop(grace=None).wait()


if __name__ == "__main__":
    main()

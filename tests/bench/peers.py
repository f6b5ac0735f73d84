"""Benchmark peers, one role per process (run by tests/bench/run.py).

Each role runs in its own process so the OS can tell us its memory alone:

    peers.py server KIND --listen ADDR [--root DIR]
        KIND: grpcio (sync, thread pool: the table's) | grpcio-aio | grpclib |
              boxfiles (the reference server) | raw | reject | watch
        prints "READY <target>" once it accepts calls, then serves until killed.
    peers.py client KIND OP --target T [--file F] [--src S] [...]
        boxfiles upload|download|copy_in|copy_out; grpclib upload|download|stdin;
        grpcio upload|download; raw upload|download; prompt reject|cancel; scale upload
        prints one JSON line: bytes, seconds, CPU, minor faults, RSS above the
        idle baseline.

The sink/source servers do the least a server can: an upload is parsed and
dropped; a download streams ``src_path`` (an absolute path) in CHUNK-sized
messages. The plain clients are written the obvious way: read a chunk, send it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import resource
import socket
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any


def _load_messages() -> Any:
    """boxfiles' generated messages, loaded WITHOUT importing boxfiles.

    The "plain" peers' processes hold nothing of boxfiles but its message
    classes, so nothing of boxfiles' own (its asyncio edge included) can
    make them less plain.
    """
    spec = importlib.util.find_spec("boxfiles")  # finds, does not import
    assert spec is not None
    assert spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0]) / "_proto" / "files_pb2.py"
    mod_spec = importlib.util.spec_from_file_location("bench_files_pb2", path)
    assert mod_spec is not None
    assert mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


if sys.argv[2:3] in (["boxfiles"], ["prompt"], ["scale"]):
    # A boxfiles process: use boxfiles' own module (one descriptor pool entry).
    from boxfiles._proto import files_pb2 as _pb2
else:
    _pb2 = _load_messages()
UploadChunk: Any = _pb2.UploadChunk
UploadResponse: Any = _pb2.UploadResponse
DownloadChunk: Any = _pb2.DownloadChunk
DownloadRequest: Any = _pb2.DownloadRequest
UPLOAD_PATH = "/boxlite.v1.Files/Upload"
DOWNLOAD_PATH = "/boxlite.v1.Files/Download"

#: Bytes of data per message, for every client and server here alike; the
#: bench sets BENCH_CHUNK for its small-message rows.
CHUNK = int(os.environ.get("BENCH_CHUNK", 1024 * 1024))
DEST = "/up.bin"  # where uploads land on the reference server (a single-file tar)


# --- memory -------------------------------------------------------------------


def _status_kib(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/{pid}/status")


class Rss:
    """Peak RSS above the idle baseline: VmHWM after resetting it to VmRSS."""

    def __init__(self) -> None:
        # clear_refs "5" resets the peak (VmHWM) to the current RSS.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _status_kib("VmRSS")
        # Minor faults tell allocator churn apart from real work (docs/contract.md: fresh
        # mmaps per chunk cost a fault per page).
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.cpu = time.process_time()

    def result(self) -> dict[str, int | float]:
        peak = _status_kib("VmHWM")
        return {
            "rss_base_kib": self.base,
            "rss_peak_kib": peak,
            "rss_delta_kib": peak - self.base,
            "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults,
            "cpu_seconds": time.process_time() - self.cpu,
        }


def report(nbytes: int | Callable[[], int], seconds: float, rss: Rss, **extra: Any) -> None:
    """Print one result; ``nbytes`` may be a function, counted only after
    the process's usage is taken."""
    usage = rss.result()
    if callable(nbytes):
        nbytes = nbytes()
    print(json.dumps({"bytes": nbytes, "seconds": seconds, **usage, **extra}), flush=True)


def file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as f:
        while data := f.read(CHUNK):
            yield data


def first_chunk(data: bytes) -> UploadChunk:
    # Both booleans explicit, as a real guest needs (docs/contract.md).
    return UploadChunk(
        dest_path=DEST, data=data, mkdir_parents=True, overwrite=True, source_is_dir=False
    )


def ready(target: str) -> None:
    print(f"READY {target}", flush=True)


# --- servers --------------------------------------------------------------------


def serve_grpcio(listen: str) -> None:
    import grpc

    def upload(requests: Iterator[UploadChunk], context: Any) -> UploadResponse:
        total = 0
        for chunk in requests:
            total += len(chunk.data)
        return UploadResponse(success=True)

    def download(request: DownloadRequest, context: Any) -> Iterator[DownloadChunk]:
        first = True
        for data in file_chunks(request.src_path):
            yield (
                DownloadChunk(data=data, source_is_dir=False) if first else DownloadChunk(data=data)
            )
            first = False

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
    # One worker per concurrent stream: the scale test runs 32 at once.
    server = grpc.server(ThreadPoolExecutor(max_workers=64))
    server.add_generic_rpc_handlers((handler,))
    if listen.startswith("unix:"):
        server.add_insecure_port(listen)
        target = listen
    else:
        port = server.add_insecure_port(listen)
        target = f"{listen.rsplit(':', 1)[0]}:{port}"
    server.start()
    ready(target)
    server.wait_for_termination()


async def serve_grpcio_aio(listen: str) -> None:
    import grpc

    async def upload(requests: Any, context: Any) -> Any:
        total = 0
        async for chunk in requests:
            total += len(chunk.data)
        return UploadResponse(success=True)

    async def download(request: Any, context: Any) -> Any:
        first = True
        for data in file_chunks(request.src_path):
            yield (
                DownloadChunk(data=data, source_is_dir=False) if first else DownloadChunk(data=data)
            )
            first = False

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
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    await server.start()
    ready(listen if listen.startswith("unix:") else f"{listen.rsplit(':', 1)[0]}:{port}")
    await server.wait_for_termination()


async def _serve_grpclib(listen: str, kind: str) -> None:
    from grpclib.const import Cardinality, Handler
    from grpclib.exceptions import GRPCError
    from grpclib.server import Server, Stream

    class Sink:
        def __mapping__(self) -> dict[str, Handler]:
            return {
                UPLOAD_PATH: Handler(
                    self.Upload, Cardinality.STREAM_UNARY, UploadChunk, UploadResponse
                ),
                DOWNLOAD_PATH: Handler(
                    self.Download, Cardinality.UNARY_STREAM, DownloadRequest, DownloadChunk
                ),
            }

        async def Upload(self, stream: Stream[Any, Any]) -> None:
            total = 0
            async for chunk in stream:
                total += len(chunk.data)
            await stream.send_message(UploadResponse(success=True))

        async def Download(self, stream: Stream[Any, Any]) -> None:
            request = await stream.recv_message()
            assert request is not None
            first = True
            for data in file_chunks(request.src_path):
                msg = (
                    DownloadChunk(data=data, source_is_dir=False)
                    if first
                    else DownloadChunk(data=data)
                )
                first = False
                await stream.send_message(msg)

    class Reject(Sink):
        # Promptness: reject after the first chunk; print when the status left.
        async def Upload(self, stream: Stream[Any, Any]) -> None:
            from grpclib.const import Status

            await stream.recv_message()
            rejected = time.monotonic()  # stamped before sending: errs long, not short
            await stream.send_trailing_metadata(
                status=Status.PERMISSION_DENIED, status_message="no"
            )
            print(f"REJECT {rejected}", flush=True)

    class Watch(Sink):
        # Promptness: receive until the client resets; print when it was seen.
        async def Upload(self, stream: Stream[Any, Any]) -> None:
            try:
                async for _ in stream:
                    pass
            except asyncio.CancelledError:
                print(f"RESET {time.monotonic()}", flush=True)
                raise
            except GRPCError:
                print(f"RESET {time.monotonic()}", flush=True)
                raise
            print(f"END {time.monotonic()}", flush=True)
            await stream.send_message(UploadResponse(success=True))

    service = {"grpclib": Sink, "reject": Reject, "watch": Watch}[kind]()
    server = Server([service])
    if listen.startswith("unix:"):
        path = listen[len("unix:") :]
        await server.start(path=path)
        target = listen
    else:
        host, port = listen.rsplit(":", 1)
        await server.start(host, int(port))
        listener = server._server
        assert isinstance(listener, asyncio.Server)
        port = str(listener.sockets[0].getsockname()[1])
        target = f"{host}:{port}"
    ready(target)
    await server.wait_closed()


def serve_boxfiles(listen: str, root: str) -> None:
    import trio

    import boxfiles

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            target = await nursery.start(
                partial(boxfiles.serve_files, chunk_size=CHUNK),
                root,
                listen if listen.startswith("unix:") else f"tcp://{listen}",
            )
            ready(target.removeprefix("tcp://"))

    trio.run(main)


def serve_raw(listen: str) -> None:
    """The ceiling: bytes over the same socket, no framing, no gRPC."""
    path = listen[len("unix:") :]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    ready(listen)
    buffer = bytearray(CHUNK)
    while True:
        conn, _ = sock.accept()
        with conn:
            header = b""
            while not header.endswith(b"\n"):
                byte = conn.recv(1)
                if not byte:  # the client went away before its request
                    break
                header += byte
            op, _, arg = header.decode().strip().partition(" ")
            if op == "UP":
                while conn.recv_into(buffer):
                    pass
                conn.sendall(b"OK")
            else:
                with open(arg, "rb", buffering=0) as f:
                    while got := f.readinto(buffer):
                        conn.sendall(memoryview(buffer)[:got])


# --- clients ----------------------------------------------------------------------


def _unix_path(target: str) -> str | None:
    return target[len("unix:") :] if target.startswith("unix:") else None


async def client_grpclib(op: str, target: str, file: str, src: str) -> None:
    from grpclib.client import Channel, StreamUnaryMethod, UnaryStreamMethod

    path = _unix_path(target)
    if path is not None:
        channel = Channel(path=path)
    else:
        host, port = target.rsplit(":", 1)
        channel = Channel(host, int(port))
    upload_method = StreamUnaryMethod(channel, UPLOAD_PATH, UploadChunk, UploadResponse)
    download_method = UnaryStreamMethod(channel, DOWNLOAD_PATH, DownloadRequest, DownloadChunk)
    rss = Rss()
    started = time.monotonic()
    total = 0
    try:
        if op == "upload":
            async with upload_method.open() as stream:
                first = True
                with open(file, "rb", buffering=0) as f:
                    while data := f.read(CHUNK):
                        await stream.send_message(
                            first_chunk(data) if first else UploadChunk(data=data)
                        )
                        first = False
                        total += len(data)
                await stream.end()
                reply = await stream.recv_message()
                assert reply is not None
                assert reply.success, reply
        else:
            async with download_method.open() as dstream:
                await dstream.send_message(
                    DownloadRequest(src_path=src, include_parent=True), end=True
                )
                with open(file, "wb", buffering=0) as out:
                    async for msg in dstream:
                        out.write(msg.data)
                        total += len(msg.data)
        seconds = time.monotonic() - started
    finally:
        channel.close()
    report(total, seconds, rss)


async def client_grpcio(op: str, target: str, file: str, src: str) -> None:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        rss = Rss()
        started = time.monotonic()
        total = 0
        if op == "upload":
            upload = channel.stream_unary(
                UPLOAD_PATH,
                request_serializer=UploadChunk.SerializeToString,
                response_deserializer=UploadResponse.FromString,
            )
            call = upload()
            first = True
            with open(file, "rb", buffering=0) as f:
                while data := f.read(CHUNK):
                    await call.write(first_chunk(data) if first else UploadChunk(data=data))
                    first = False
                    total += len(data)
            await call.done_writing()
            reply = await call
            assert reply.success, reply
        else:
            download = channel.unary_stream(
                DOWNLOAD_PATH,
                request_serializer=DownloadRequest.SerializeToString,
                response_deserializer=DownloadChunk.FromString,
            )
            with open(file, "wb", buffering=0) as out:
                async for msg in download(DownloadRequest(src_path=src, include_parent=True)):
                    out.write(msg.data)
                    total += len(msg.data)
        seconds = time.monotonic() - started
    report(total, seconds, rss)


def client_boxfiles(op: str, target: str, file: str, src: str, args: argparse.Namespace) -> None:
    import trio

    import boxfiles

    async def main() -> None:
        async with boxfiles.open_client(target) as client:
            rss = Rss()
            started = time.monotonic()
            if op == "upload":
                await client.upload_tar(file, DEST, source_is_dir=False, chunk_size=CHUNK)
            elif op == "download":
                await client.download_tar(src, file)
            elif op == "copy_in":
                await client.copy_in(file, src)
            elif op == "copy_out":
                await client.copy_out(src, file)
            else:
                raise SystemExit(f"unknown op {op}")
            # Counted after the clock stops: walking a tree of 10,000 files
            # again is not part of the transfer.
            report(partial(_tree_bytes, file), time.monotonic() - started, rss)

    trio.run(main)


def _tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink()
    )


@contextmanager
def _unix_connection(target: str) -> Iterator[socket.socket]:
    path = _unix_path(target)
    assert path is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        yield sock


def client_raw(op: str, target: str, file: str, src: str) -> None:
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with _unix_connection(target) as sock:
        rss = Rss()
        started = time.monotonic()
        total = 0
        if op == "upload":
            sock.sendall(b"UP\n")
            with open(file, "rb", buffering=0) as f:
                while got := f.readinto(buffer):
                    sock.sendall(view[:got])
                    total += got
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(2) == b"OK"
        else:
            sock.sendall(f"DOWN {src}\n".encode())
            with open(file, "wb", buffering=0) as out:
                while got := sock.recv_into(buffer):
                    out.write(view[:got])
                    total += got
        report(total, time.monotonic() - started, rss)


def client_h2(op: str, target: str, file: str) -> None:
    """An upload written as HTTP/2 frames by hand, one ``sendmsg`` per
    message and no gRPC or HTTP/2 library on the way: where the sink sets
    the pace, a rate no Python sender beats by much (the sink's ceiling)."""
    import hpack

    if op != "upload":
        raise SystemExit("the h2 client only uploads")
    # A data field's key and length, as protobuf encodes them, per size.
    heads: dict[int, bytes] = {}
    frames = _H2Frames()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with _unix_connection(target) as sock:
        rss = Rss()
        started = time.monotonic()
        headers = hpack.Encoder().encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", UPLOAD_PATH),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frames.header(0, 4, 0, 0))  # SETTINGS
        sock.sendall(frames.header(len(headers), 1, 4, 1) + headers)  # END_HEADERS
        meta = first_chunk(b"").SerializeToString()
        total = 0
        with open(file, "rb", buffering=0) as f:
            while got := f.readinto(buffer):
                if got not in heads:
                    heads[got] = UploadChunk(data=bytes(got)).SerializeToString()[:-got]
                body = meta + heads[got]
                meta = b""
                pieces = [b"\0" + (len(body) + got).to_bytes(4, "big") + body, view[:got]]
                frames.send_data(sock, pieces, len(pieces[0]) + got)
                total += got
        frames.send_data(sock, [], 0, end=True)
        status = frames.read_until_trailers(sock, hpack.Decoder())
        seconds = time.monotonic() - started
    if status != "0":
        raise SystemExit(f"the sink answered grpc-status {status}")
    report(total, seconds, rss)


class _H2Frames:
    """Just enough HTTP/2 for one upload on stream 1: flow control,
    SETTINGS and PING answered, the trailers' status read."""

    def __init__(self) -> None:
        self.window = self.stream_window = self.initial = 65_535
        self.max_frame = 16_384
        self.inbox = bytearray()
        self.status: str | None = None

    @staticmethod
    def header(length: int, kind: int, flags: int, stream: int) -> bytes:
        return length.to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big")

    def send_data(
        self, sock: socket.socket, pieces: list[Any], size: int, end: bool = False
    ) -> None:
        views = [memoryview(p).cast("B") for p in pieces]
        while True:
            self._take(sock, wait=False)
            while min(self.window, self.stream_window) <= 0 and size:
                self._take(sock, wait=True)
            n = min(size, self.window, self.stream_window, self.max_frame)
            out: list[Any] = [self.header(n, 0, 1 if end and n == size else 0, 1)]
            left = n
            while left:
                piece = views[0][:left]
                out.append(piece)
                left -= len(piece)
                views[0] = views[0][len(piece) :]
                if not views[0]:
                    views.pop(0)
            sent = sock.sendmsg(out)
            if sent < sum(map(len, out)):
                sock.sendall(b"".join(out)[sent:])
            self.window -= n
            self.stream_window -= n
            size -= n
            if not size:
                return

    def read_until_trailers(self, sock: socket.socket, decoder: Any) -> str | None:
        while self.status is None:
            self._take(sock, wait=True, decoder=decoder)
        return self.status

    def _take(self, sock: socket.socket, wait: bool, decoder: Any = None) -> None:
        try:
            data = sock.recv(1 << 16, 0 if wait else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if not data:
            raise SystemExit("the sink closed the connection")
        self.inbox += data
        replies = b""
        while len(self.inbox) >= 9 and len(self.inbox) >= 9 + (
            n := int.from_bytes(self.inbox[:3], "big")
        ):
            kind, flags, stream = (
                self.inbox[3],
                self.inbox[4],
                int.from_bytes(self.inbox[5:9], "big"),
            )
            payload = bytes(self.inbox[9 : 9 + n])
            del self.inbox[: 9 + n]
            if kind == 4 and not flags & 1:  # SETTINGS: acknowledged
                for i in range(0, n, 6):
                    key, value = (
                        int.from_bytes(payload[i : i + 2], "big"),
                        int.from_bytes(payload[i + 2 : i + 6], "big"),
                    )
                    if key == 4:
                        self.stream_window += value - self.initial
                        self.initial = value
                    elif key == 5:
                        self.max_frame = value
                replies += self.header(0, 4, 1, 0)
            elif kind == 6 and not flags & 1:  # PING: answered
                replies += self.header(8, 6, 1, 0) + payload
            elif kind == 8:  # WINDOW_UPDATE
                increment = int.from_bytes(payload, "big") & 0x7FFF_FFFF
                if stream:
                    self.stream_window += increment
                else:
                    self.window += increment
            elif kind == 1 and stream == 1 and decoder is not None:
                fields = dict(decoder.decode(payload))
                if "grpc-status" in fields:
                    self.status = fields["grpc-status"]
            elif kind in (3, 7):  # RST_STREAM, GOAWAY
                raise SystemExit(f"the sink ended the upload (frame type {kind})")
        if replies:
            sock.sendall(replies)


# --- promptness and scale (boxfiles clients driving the grpclib servers above) ------


class _Endless:
    """An AsyncReader that never ends: the upload only stops when told to."""

    def __init__(self) -> None:
        self._data = bytes(CHUNK)

    async def read(self, max_bytes: int) -> bytes:
        import trio

        await trio.lowlevel.checkpoint()
        return self._data[:max_bytes]


def client_prompt(op: str, target: str, trials: int) -> None:
    """reject: time each rejected call's return; cancel: time each cancel."""
    import trio

    import boxfiles

    async def main() -> None:
        times: list[float] = []
        async with boxfiles.open_client(target) as client:
            for _ in range(trials):
                if op == "reject":
                    try:
                        await client.upload_tar(_Endless(), DEST)
                    except boxfiles.PermissionDenied:
                        times.append(time.monotonic())
                    else:
                        raise AssertionError("upload was not rejected")
                else:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(client.upload_tar, _Endless(), DEST)
                        await trio.sleep(0.05)
                        # time.monotonic, not trio's clock: trio's has an
                        # offset and the server process stamps with this one.
                        times.append(time.monotonic())
                        nursery.cancel_scope.cancel()
                    # The server prints when it saw the reset; let it land
                    # before the next call so the lines pair up.
                    await trio.sleep(0.1)
        print(json.dumps({"times": times}), flush=True)

    trio.run(main)


def client_scale(target: str, file: str, streams: int) -> None:
    """``streams`` concurrent uploads of ``file`` over one boxfiles client."""
    import trio

    import boxfiles

    async def main() -> None:
        async with boxfiles.open_client(target) as client:
            rss = Rss()
            started = time.monotonic()
            async with trio.open_nursery() as nursery:
                for _ in range(streams):
                    nursery.start_soon(client.upload_tar, file, DEST)
            seconds = time.monotonic() - started
            report(os.path.getsize(file) * streams, seconds, rss, streams=streams)

    trio.run(main)


async def client_grpclib_stdin(target: str) -> None:
    """Upload whatever arrives on stdin (``tar cf - dir |``), the obvious way."""
    from grpclib.client import Channel, StreamUnaryMethod

    path = _unix_path(target)
    assert path is not None
    channel = Channel(path=path)
    rss = Rss()
    started = time.monotonic()
    total = 0
    try:
        async with StreamUnaryMethod(
            channel, UPLOAD_PATH, UploadChunk, UploadResponse
        ).open() as stream:
            first = True
            # Buffered: read(CHUNK) gathers full chunks from a 64 KiB pipe.
            stdin = sys.stdin.buffer
            while data := stdin.read(CHUNK):
                msg = UploadChunk(data=data)
                if first:
                    msg = UploadChunk(
                        dest_path="/small",
                        data=data,
                        mkdir_parents=True,
                        overwrite=True,
                        source_is_dir=True,
                    )
                first = False
                await stream.send_message(msg)
                total += len(data)
            await stream.end()
            reply = await stream.recv_message()
            assert reply is not None
            assert reply.success, reply
        seconds = time.monotonic() - started
    finally:
        channel.close()
    report(total, seconds, rss)


# --- command line -----------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("kind")
    s.add_argument("--listen", required=True)
    s.add_argument("--root", default="")
    c = sub.add_parser("client")
    c.add_argument("kind")
    c.add_argument("op")
    c.add_argument("--target", required=True)
    c.add_argument("--file", default="")
    c.add_argument("--src", default="")
    c.add_argument("--trials", type=int, default=50)
    c.add_argument("--streams", type=int, default=32)
    args = parser.parse_args()

    if args.role == "server":
        if args.kind == "grpcio":
            serve_grpcio(args.listen)
        elif args.kind == "grpcio-aio":
            asyncio.run(serve_grpcio_aio(args.listen))
        elif args.kind in ("grpclib", "reject", "watch"):
            asyncio.run(_serve_grpclib(args.listen, args.kind))
        elif args.kind == "boxfiles":
            serve_boxfiles(args.listen, args.root)
        elif args.kind == "raw":
            serve_raw(args.listen)
        else:
            raise SystemExit(f"unknown server {args.kind}")
        return
    if args.kind == "grpclib":
        if args.op == "stdin":
            asyncio.run(client_grpclib_stdin(args.target))
        else:
            asyncio.run(client_grpclib(args.op, args.target, args.file, args.src))
    elif args.kind == "grpcio":
        asyncio.run(client_grpcio(args.op, args.target, args.file, args.src))
    elif args.kind == "boxfiles":
        client_boxfiles(args.op, args.target, args.file, args.src, args)
    elif args.kind == "raw":
        client_raw(args.op, args.target, args.file, args.src)
    elif args.kind == "h2":
        client_h2(args.op, args.target, args.file)
    elif args.kind == "prompt":
        client_prompt(args.op, args.target, args.trials)
    elif args.kind == "scale":
        client_scale(args.target, args.file, args.streams)
    else:
        raise SystemExit(f"unknown client {args.kind}")


if __name__ == "__main__":
    main()

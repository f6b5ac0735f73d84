"""Many transfers at once, and clients that misbehave: every upload is applied
whole or not at all, and the server keeps serving."""

from __future__ import annotations

import os
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
import trio

import boxfiles
from boxfiles._aio import SERVER_RECEIVE_FRAME_LIMIT, open_channel
from boxfiles._proto.files_pb2 import UploadChunk
from boxfiles._target import parse_target
from boxfiles._wire import UPLOAD

from ..helpers.archives import archive, contents, files, member
from ..helpers.raw import RawClient, grpc_message
from ..helpers.servers import download, upload
from ..helpers.trees import listing, no_staging, wait_for_no_staging

N = 16


def version(i: int) -> bytes:
    return files(**{f"f{j}": f"{i}:{j};".encode() * 2000 for j in range(4)})


def which_version(top: Path) -> int:
    """The single upload whose files ``top`` holds (fails on a mix)."""
    seen = {(top / f"f{j}").read_bytes().split(b":")[0] for j in range(4)}
    assert len(seen) == 1, f"a mix of uploads: {seen}"
    assert sorted(os.listdir(top)) == [f"f{j}" for j in range(4)]
    return int(seen.pop())


async def test_many_uploads_and_downloads_at_once(server: str, root: Path) -> None:
    (root / "src").mkdir()
    for j in range(4):
        (root / "src" / f"s{j}").write_bytes(os.urandom(200_000))
    expected = {f"src/s{j}": (root / "src" / f"s{j}").read_bytes() for j in range(4)}
    hostile = archive(member("ok", b"x" * 50_000), member("../escape", b"x"))
    once_ok: list[int] = []
    downloads: list[dict[str, bytes]] = []

    async def to_own(i: int) -> None:
        await upload(server, version(i), f"/own/{i}")

    async def to_same(i: int) -> None:
        await upload(server, version(i), "/same", overwrite=True)

    async def once(i: int) -> None:
        try:
            await upload(server, version(i), "/once", overwrite=False)
        except boxfiles.AlreadyExists:
            return
        once_ok.append(i)

    async def rejected() -> None:
        with pytest.raises(boxfiles.InvalidArgument, match="escape"):
            await upload(server, hostile, "/same", overwrite=True)

    async def fetch() -> None:
        data, _ = await download(server, "/src")
        downloads.append(contents(data))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(N):
                nursery.start_soon(to_own, i)
                nursery.start_soon(to_same, i)
                nursery.start_soon(once, i)
                nursery.start_soon(fetch)
                if i % 4 == 0:
                    nursery.start_soon(rejected)

    for i in range(N):
        assert which_version(root / "own" / str(i)) == i
    assert 0 <= which_version(root / "same") < N
    assert len(once_ok) == 1
    assert which_version(root / "once") == once_ok[0]
    assert downloads == [expected] * N
    assert not (root / "escape").exists()
    assert no_staging(root)


@pytest.fixture
def partial() -> bytes:
    """The first chunk of an upload whose archive is not finished."""
    data = archive(member("a", b"a" * 5000), member("b", b"b" * 5000))
    return grpc_message(UploadChunk(dest_path="/x", data=data[:8000], mkdir_parents=True))


async def wait_for_staging(root: Path) -> None:
    with trio.fail_after(5):
        while no_staging(root):
            await trio.sleep(0.01)


async def test_abrupt_disconnect_mid_upload(server: str, root: Path, partial: bytes) -> None:
    (root / "keep").write_text("k")
    before = listing(root)
    stream = await trio.open_unix_socket(server.removeprefix("unix:"))
    client = RawClient(stream)
    await client.start_upload(partial)
    await wait_for_staging(root)
    await stream.aclose()  # no RST_STREAM, no GOAWAY: the socket just goes
    await wait_for_no_staging(root)
    assert listing(root) == before
    await upload(server, files(f=b"fine"), "/f")


async def test_half_open_stream_then_disconnect(server: str, root: Path, partial: bytes) -> None:
    before = listing(root)
    stream = await trio.open_unix_socket(server.removeprefix("unix:"))
    client = RawClient(stream)
    await client.start_upload(partial)
    await wait_for_staging(root)
    # Other calls go on while that stream hangs half-open.
    await upload(server, files(f=b"fine"), "/f")
    assert (root / "f").read_bytes() == b"fine"
    await stream.aclose()
    await wait_for_no_staging(root)
    (root / "f").unlink()
    assert listing(root) == before


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(os.urandom(4096), id="no-preface"),
        pytest.param(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + b"\x00\x00\x04\x00\x00\x00\x00\x00\x07"
            + b"x" * 64,
            id="bad-frame-after-preface",
        ),
    ],
)
async def test_garbage_on_the_connection(server: str, root: Path, garbage: bytes) -> None:
    stream = await trio.open_unix_socket(server.removeprefix("unix:"))
    try:
        await stream.send_all(garbage)
        with trio.fail_after(5):
            while await stream.receive_some():
                pass  # the server answers (GOAWAY) and closes
    except trio.BrokenResourceError:
        pass  # or resets the connection before reading it all
    finally:
        await stream.aclose()
    await upload(server, files(f=b"fine"), "/f")
    assert (root / "f").read_bytes() == b"fine"


async def test_malformed_grpc_message(server: str, root: Path) -> None:
    stream = await trio.open_unix_socket(server.removeprefix("unix:"))
    client = RawClient(stream)
    # A length prefix promising more than follows, then the end of the stream.
    sid = await client.start_upload(b"\x00\x00\x10\x00\x00" + b"\x0a\x02/x")
    client.conn.end_stream(sid)
    await stream.send_all(client.conn.data_to_send())
    await stream.aclose()
    await wait_for_no_staging(root)
    await upload(server, files(f=b"fine"), "/f")
    assert os.listdir(root) == ["f"]


@pytest.mark.parametrize(
    "later",
    [
        pytest.param(None, id="first-chunk"),
        pytest.param(grpc_message(UploadChunk(data=b"x" * 512)), id="later-chunk"),
    ],
)
async def test_malformed_upload_chunk(server: str, root: Path, later: bytes | None) -> None:
    # Well framed gRPC, but not a protobuf message: a bytes field (dest_path)
    # declaring 127 bytes where 2 follow.
    bad = b"\x00\x00\x00\x00\x04" + b"\x0a\x7f/x"
    first = grpc_message(UploadChunk(dest_path="/m", data=archive(member("m", b"m" * 4096))))
    messages = [bad] if later is None else [first, bad]
    async with open_channel(parse_target(server)) as channel:
        async with channel.open_call(UPLOAD) as call:
            await call.send_encoded(*messages)
            await call.end()
            with pytest.raises(boxfiles.InvalidArgument, match="malformed UploadChunk"):
                await call.recv()
    await wait_for_no_staging(root)
    assert os.listdir(root) == []


async def test_large_frame_read_together_with_the_settings_ack(server: str, root: Path) -> None:
    # The server lets clients send frames of up to SERVER_RECEIVE_FRAME_LIMIT. A client may
    # do so as soon as it has acknowledged that setting, so the ACK and such a
    # frame can reach the server in one read.
    payload = os.urandom(SERVER_RECEIVE_FRAME_LIMIT)
    message = grpc_message(
        UploadChunk(dest_path="/big", data=archive(member("big", payload)), mkdir_parents=True)
    )
    stream = await trio.open_unix_socket(server.removeprefix("unix:"))
    client = RawClient(stream)
    conn = client.conn
    async with stream:
        await stream.send_all(conn.data_to_send())
        with trio.fail_after(5):
            while (
                conn.remote_settings.max_frame_size != SERVER_RECEIVE_FRAME_LIMIT
                or conn.outbound_flow_control_window < len(message)
            ):
                data = await stream.receive_some()
                assert data, "the server closed before announcing its settings"
                conn.receive_data(data)
        # One write: the ACK, the HEADERS, and a DATA frame of SERVER_RECEIVE_FRAME_LIMIT bytes.
        sid = await client.start_upload(message[:SERVER_RECEIVE_FRAME_LIMIT])
        conn.send_data(sid, message[SERVER_RECEIVE_FRAME_LIMIT:], end_stream=True)
        await stream.send_all(conn.data_to_send())
        trailers: dict[bytes, bytes] = {}
        with trio.fail_after(5):
            while not trailers:
                data = await stream.receive_some()
                assert data, "the server closed the connection"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.TrailersReceived):
                        trailers = dict(event.headers or [])
                await stream.send_all(conn.data_to_send())
    assert trailers[b"grpc-status"] == b"0"
    assert (root / "big").read_bytes() == payload

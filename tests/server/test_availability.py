"""Clients that stall cannot freeze the server: transfers are capped, each
runs in a worker thread of its own, and one whose client makes no progress
for the idle timeout is failed, leaving nothing behind."""

from __future__ import annotations

import math
import os
import threading
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import h2.events
import h2.settings
import pytest
import trio

import boxfiles
from boxfiles._aio import Channel, ClientCall, open_channel
from boxfiles._cli import EXIT_USAGE
from boxfiles._proto.files_pb2 import DownloadRequest
from boxfiles._server._service import MAX_TRANSFERS
from boxfiles._target import parse_target
from boxfiles._wire import DOWNLOAD, UPLOAD

from ..helpers.archives import SlowReader, contents, files
from ..helpers.checks import Leaks
from ..helpers.processes import PROMPT, boxfiles_cmd, one_line_error, serve_process
from ..helpers.raw import RawClient, grpc_message, one_header, stall_download, stall_upload
from ..helpers.servers import download, serving, upload
from ..helpers.trees import listing, wait_for_no_staging

#: Stalled transfers of each kind: more than trio's 40 default worker threads.
N = 48
MiB = 1024 * 1024


def parked_server_threads() -> int:
    """Worker threads running the server's blocking work right now (trio
    names a busy worker after the function and the task that started it)."""
    return sum(" from boxfiles._server._service." in t.name for t in threading.enumerate())


async def wait_parked(count: int) -> None:
    with trio.fail_after(30):
        while parked_server_threads() < count:
            await trio.sleep(0.05)


async def open_stalled(
    stack: AsyncExitStack, channel: Channel, upload: bool
) -> ClientCall[Any, Any]:
    """A call that sends one tar header (upload) or its request for /big.bin
    (download) and then neither sends nor reads anything more; reset when
    ``stack`` closes."""
    call: ClientCall[Any, Any]
    if upload:
        call = await stack.enter_async_context(channel.open_call(UPLOAD))
        await call.send_encoded(one_header(f"/stalled/{id(call)}"))
    else:
        call = await stack.enter_async_context(channel.open_call(DOWNLOAD))
        await call.send(DownloadRequest(src_path="/big.bin"), end=True)
    return call


async def hold_stalled(
    target: str, uploads: int, downloads: int, task_status: trio.TaskStatus[None]
) -> None:
    """Open stalled calls and keep them until cancelled (which resets them).

    Uploads get connections of their own; downloads share one, so the data
    the server manages to send them stays small.
    """
    async with open_channel(parse_target(target)) as shared, AsyncExitStack() as stack:
        for _ in range(uploads):
            # Opened inside ``shared``'s block: one asyncio loop for them all.
            channel = await stack.enter_async_context(open_channel(parse_target(target)))
            await open_stalled(stack, channel, upload=True)
        for _ in range(downloads):
            await open_stalled(stack, shared, upload=False)
        task_status.started()
        await trio.sleep_forever()


async def round_trip(target: str) -> None:
    data = os.urandom(100_000)
    await upload(target, files(f=data), "/healthy/", mkdir_parents=True)
    archive_bytes, _ = await download(target, "/healthy/f")
    assert archive_bytes is not None
    assert contents(archive_bytes) == {"f": data}


async def test_stalled_clients_do_not_freeze_the_server(root: Path, sock_dir: Path) -> None:
    leaks = Leaks()
    (root / "big.bin").write_bytes(os.urandom(8 * MiB))
    before = listing(root)
    options = {"max_transfers": 2 * N + 1, "idle_timeout": 60, "chunk_size": 65536}
    async with serving(root, sock_dir, **options) as target:
        async with trio.open_nursery() as clients:
            await clients.start(hold_stalled, target, N, N)
            await wait_parked(2 * N)  # every one admitted, parked in its thread
            with trio.fail_after(10):
                await round_trip(target)
            # One more fills the cap; the next transfer is refused at once.
            await clients.start(hold_stalled, target, 1, 0)
            await wait_parked(2 * N + 1)
            with trio.fail_after(5):
                with pytest.raises(boxfiles.ResourceExhausted, match="server busy"):
                    await upload(target, files(f=b"late"), "/late", mkdir_parents=True)
                with pytest.raises(boxfiles.ResourceExhausted, match="server busy"):
                    await download(target, "/big.bin")
            clients.cancel_scope.cancel()
        # The slots come back as the stalled calls are reset.
        await wait_for_no_staging(root)
        with trio.fail_after(10):
            while parked_server_threads():
                await trio.sleep(0.05)
            await round_trip(target)
    (root / "healthy" / "f").unlink()
    (root / "healthy").rmdir()
    assert listing(root) == before
    await leaks.check()


async def test_default_cap(root: Path, sock_dir: Path) -> None:
    async with serving(root, sock_dir) as target, trio.open_nursery() as clients:
        await clients.start(hold_stalled, target, MAX_TRANSFERS, 0)
        await wait_parked(MAX_TRANSFERS)
        with trio.fail_after(5), pytest.raises(boxfiles.ResourceExhausted, match="server busy"):
            await download(target, "/")
        clients.cancel_scope.cancel()


def mtimes(top: Path) -> dict[str, int]:
    """Below ``top``: the root's own mtime moves with any upload's staging."""
    return {str(p): p.lstat().st_mtime_ns for p in top.rglob("*")}


@pytest.mark.parametrize("first", [True, False], ids=["after-a-header", "before-any-message"])
async def test_idle_timeout_fails_a_stalled_upload(root: Path, sock_dir: Path, first: bool) -> None:
    leaks = Leaks()
    (root / "dest").mkdir()
    (root / "dest" / "f").write_bytes(b"old")
    os.chmod(root / "dest" / "f", 0o600)
    os.utime(root / "dest" / "f", ns=(1, 1_500_000_000_000_000_000))
    before = listing(root), mtimes(root)
    async with serving(root, sock_dir, idle_timeout=0.5) as target:
        async with open_channel(parse_target(target)) as channel:
            with trio.fail_after(10):
                with pytest.raises(boxfiles.DeadlineExceeded, match="idle timeout"):
                    await stall_upload(channel, first)
        await wait_for_no_staging(root)
        assert (listing(root), mtimes(root)) == before
        await upload(target, files(f=b"fine"), "/fine")  # and the server goes on
    await leaks.check()


@pytest.mark.parametrize("request_sent", [True, False], ids=["never-read", "no-request"])
async def test_idle_timeout_fails_a_stalled_download(
    root: Path, sock_dir: Path, request_sent: bool
) -> None:
    leaks = Leaks()
    (root / "big.bin").write_bytes(os.urandom(8 * MiB))
    received: list[int] = []
    async with serving(root, sock_dir, idle_timeout=0.5) as target:
        async with open_channel(parse_target(target)) as channel:
            with trio.fail_after(10):
                with pytest.raises(boxfiles.DeadlineExceeded, match="idle timeout"):
                    await stall_download(channel, request_sent, received)
        assert sum(received) < 8 * MiB
        await upload(target, files(f=b"fine"), "/fine")
    await leaks.check()


async def test_idle_timeout_frees_a_download_whose_client_reads_no_bytes(
    root: Path, sock_dir: Path
) -> None:
    # A raw HTTP/2 peer that opens every window wide and then never reads its
    # socket: the server's writes back up, not just the stream's window.
    (root / "big.bin").write_bytes(os.urandom(8 * MiB))
    (root / "small").write_bytes(b"s")
    leaks = Leaks()
    options = {"max_transfers": 1, "idle_timeout": 0.5, "chunk_size": 65536}
    async with serving(root, sock_dir, **options) as target:
        stream = await trio.open_unix_socket(target.removeprefix("unix:"))
        async with stream:
            client = RawClient(stream)
            client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
            client.conn.increment_flow_control_window(2**31 - 1 - 65535)
            request = grpc_message(DownloadRequest(src_path="/big.bin"))
            await client.start_call("Download", request, end=True)
            # Its slot (the only one) comes back after the idle timeout.
            with trio.fail_after(10):
                while True:
                    try:
                        await download(target, "/small")
                        break
                    except boxfiles.ResourceExhausted:
                        await trio.sleep(0.1)
            # Read at last: what was sent, then the status that ended it.
            trailers: dict[bytes, bytes] = {}
            with trio.fail_after(10):
                while not trailers:
                    data = await stream.receive_some()
                    assert data, "the server closed the connection without a status"
                    for event in client.conn.receive_data(data):
                        if isinstance(event, h2.events.TrailersReceived):
                            trailers = dict(event.headers or [])
                    await stream.send_all(client.conn.data_to_send())
            assert trailers[b"grpc-status"] == b"%d" % boxfiles.Status.DEADLINE_EXCEEDED
    await leaks.check()


class SlowWriter:
    def __init__(self, pause: float) -> None:
        self.data = bytearray()
        self._pause = pause

    async def write(self, data: bytes) -> None:
        self.data += data
        await trio.sleep(self._pause)


async def test_idle_timeout_spares_slow_clients_that_progress(root: Path, sock_dir: Path) -> None:
    # Each pause is under the idle timeout; all of them together are well over it.
    payload = os.urandom(8 * MiB)
    async with serving(root, sock_dir, idle_timeout=1.0) as target:
        async with boxfiles.open_client(target) as client:
            slow = SlowReader(files(f=payload[: 2 * MiB]), 256 * 1024, 0.3)
            await client.upload_tar(slow, "/up", chunk_size=256 * 1024)
            assert (root / "up").read_bytes() == payload[: 2 * MiB]
            (root / "big.bin").write_bytes(payload)
            writer = SlowWriter(0.3)
            await client.download_tar("/big.bin", writer)
            assert contents(bytes(writer.data)) == {"big.bin": payload}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_transfers": 0}, "max_transfers"),
        ({"max_transfers": True}, "max_transfers"),
        ({"max_transfers": 2.0}, "max_transfers"),
        ({"idle_timeout": 0}, "idle_timeout"),
        ({"idle_timeout": -1.0}, "idle_timeout"),
        ({"idle_timeout": math.inf}, "idle_timeout"),
        ({"idle_timeout": math.nan}, "idle_timeout"),
        ({"idle_timeout": "5"}, "idle_timeout"),
    ],
)
async def test_bad_limits(root: Path, sock_dir: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        async with serving(root, sock_dir, **kwargs):
            pass


async def hold_the_only_slot(channel: Channel, target: str) -> None:
    """A stalled upload: others are refused until the idle timeout ends it."""
    async with channel.open_call(UPLOAD) as call:
        await call.send_encoded(one_header("/stalled"))
        with pytest.raises(boxfiles.ResourceExhausted, match="server busy"):
            await upload(target, files(f=b"x"), "/f")
        await call.recv()


async def test_serve_flags(tmp_path: Path, sock_dir: Path) -> None:
    for flag in ("--max-transfers", "--idle-timeout"):
        result = await boxfiles_cmd("serve", "--root", ".", "--listen", "unix:/x", flag, "0")
        assert result.returncode == EXIT_USAGE
        assert "must be positive" in one_line_error(result)
    sock = sock_dir / "s.sock"
    target = f"unix:{sock}"
    flags = ("--max-transfers", "1", "--idle-timeout", "0.5")
    async with serve_process(tmp_path, sock, *flags), open_channel(parse_target(target)) as channel:
        with trio.fail_after(PROMPT):
            with pytest.raises(boxfiles.DeadlineExceeded, match="idle timeout"):
                await hold_the_only_slot(channel, target)
            await upload(target, files(f=b"x"), "/f")
    assert (tmp_path / "f").read_bytes() == b"x"

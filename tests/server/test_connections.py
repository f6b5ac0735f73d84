"""Connections are bounded too: at most MAX_CONNECTIONS open at once (one more
is sent GOAWAY and closed), and one that stays quiet with no call in flight
is closed after CONNECTION_IDLE_TIMEOUT."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import trio

import boxfiles
from boxfiles._aio._internals import MAX_HEADER_BLOCK_BYTES
from boxfiles._cli import EXIT_USAGE
from boxfiles._server import CONNECTION_IDLE_TIMEOUT, MAX_CONNECTIONS

from ..helpers.archives import BytesReader, SlowReader, files
from ..helpers.processes import boxfiles_cmd, one_line_error
from ..helpers.servers import serving, upload

#: Generous: every wait below is for something that happens in well under it.
PROMPT = 10.0


async def connect(target: str) -> trio.SocketStream:
    return await trio.open_unix_socket(target.removeprefix("unix:"))


async def read_until_closed(stream: trio.SocketStream) -> list[h2.events.Event]:
    """Every HTTP/2 event the server sends until it closes the connection."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    await stream.send_all(conn.data_to_send())
    events: list[h2.events.Event] = []
    while data := await stream.receive_some():
        events += conn.receive_data(data)
    return events


async def test_past_the_cap_a_connection_gets_goaway_and_a_client_unavailable(
    root: Path, sock_dir: Path
) -> None:
    async with serving(root, sock_dir, max_connections=2) as target:
        held = [await connect(target) for _ in range(2)]
        with trio.fail_after(PROMPT):
            async with await connect(target) as refused:
                events = await read_until_closed(refused)
        goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert len(goaways) == 1
        assert goaways[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert goaways[0].last_stream_id == 0  # nothing it sent was processed
        assert goaways[0].additional_data == b"too many connections (at most 2)"
        with trio.fail_after(PROMPT):
            with pytest.raises(boxfiles.Unavailable, match=r"too many connections|GOAWAY"):
                await upload(target, files(f=b"x"), "/f")
        assert not (root / "f").exists()
        # A connection that goes frees its place.
        await held.pop().aclose()
        with trio.fail_after(PROMPT):
            while True:
                try:
                    await upload(target, files(f=b"x"), "/f")
                    break
                except boxfiles.Unavailable:
                    await trio.sleep(0.05)  # the server has not seen the close yet
        assert (root / "f").read_bytes() == b"x"
        for stream in held:
            await stream.aclose()


async def test_a_quiet_connection_is_closed(root: Path, sock_dir: Path) -> None:
    async with serving(root, sock_dir, connection_idle_timeout=0.5) as target:
        async with await connect(target) as stream:
            with trio.fail_after(PROMPT):
                events = await read_until_closed(stream)  # sends the preface, then nothing
        assert any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events)


async def test_a_client_reconnects_after_its_quiet_connection_is_closed(
    root: Path, sock_dir: Path
) -> None:
    async with serving(root, sock_dir, connection_idle_timeout=0.2) as target:
        async with boxfiles.open_client(target) as client:
            await client.upload_tar(BytesReader(files(a=b"1")), "/")
            await trio.sleep(1.0)  # past the timeout, and half as long again, twice
            with trio.fail_after(PROMPT):
                await client.upload_tar(BytesReader(files(b=b"2")), "/")
    assert (root / "a").read_bytes() == b"1"
    assert (root / "b").read_bytes() == b"2"


async def test_a_call_in_flight_keeps_its_quiet_connection(root: Path, sock_dir: Path) -> None:
    # Each pause is longer than the connection idle timeout but under the
    # transfer's: the call is slow, not gone, and must complete.
    payload = bytes(range(256)) * 1024
    async with serving(root, sock_dir, connection_idle_timeout=0.2, idle_timeout=5.0) as target:
        async with boxfiles.open_client(target) as client:
            slow = SlowReader(files(f=payload), 64 * 1024, 0.7)
            with trio.fail_after(PROMPT * 2):
                await client.upload_tar(slow, "/up", chunk_size=64 * 1024)
    assert (root / "up").read_bytes() == payload


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_connections": 0}, "max_connections"),
        ({"max_connections": True}, "max_connections"),
        ({"max_connections": 2.0}, "max_connections"),
        ({"connection_idle_timeout": 0}, "connection_idle_timeout"),
        ({"connection_idle_timeout": math.inf}, "connection_idle_timeout"),
        ({"connection_idle_timeout": math.nan}, "connection_idle_timeout"),
    ],
)
async def test_bad_connection_limits(
    root: Path, sock_dir: Path, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        async with serving(root, sock_dir, **kwargs):
            pass


async def test_serve_connection_flags() -> None:
    for flag in ("--max-connections", "--connection-idle-timeout"):
        result = await boxfiles_cmd("serve", "--root", ".", "--listen", "unix:/x", flag, "0")
        assert result.returncode == EXIT_USAGE
        assert "must be positive" in one_line_error(result)
    result = await boxfiles_cmd("serve", "--help")
    help_text = " ".join(result.stdout.decode().split())
    assert f"({MAX_CONNECTIONS})" in help_text
    assert f"({CONNECTION_IDLE_TIMEOUT:g})" in help_text


@pytest.mark.parametrize("shape", ["continuations", "one frame"])
async def test_a_header_block_over_its_bound_ends_that_connection_only(
    root: Path, sock_dir: Path, shape: str
) -> None:
    # The server accepts 1 MiB frames for DATA's sake; a header block, held
    # whole until it ends, may not grow past MAX_HEADER_BLOCK_BYTES: neither
    # by CONTINUATIONs (h2 alone would hold 64 of them, of 1 MiB each) nor in
    # one frame. Refused on a frame header, before its body is sent.
    piece = bytes(16 * 1024)
    if shape == "continuations":
        frames = _frame(1, 0, piece) + b"".join(
            _frame(9, 0, piece) for _ in range(MAX_HEADER_BLOCK_BYTES // len(piece) - 1)
        )
        frames += (len(piece)).to_bytes(3, "big") + bytes([9, 0]) + (1).to_bytes(4, "big")
    else:
        frames = (
            (MAX_HEADER_BLOCK_BYTES + 1).to_bytes(3, "big") + bytes([1, 0]) + (1).to_bytes(4, "big")
        )
    async with serving(root, sock_dir) as target:
        async with await connect(target) as stream:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            await stream.send_all(conn.data_to_send() + frames)
            events: list[h2.events.Event] = []
            with trio.fail_after(PROMPT):
                while data := await stream.receive_some():
                    events += conn.receive_data(data)
        goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert [g.error_code for g in goaways] == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]
        with trio.fail_after(PROMPT):
            await upload(target, files(f=b"x"), "/f")  # others are served as before
        assert (root / "f").read_bytes() == b"x"


def _frame(kind: int, flags: int, payload: bytes, stream_id: int = 1) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes([kind, flags])
        + stream_id.to_bytes(4, "big")
        + payload
    )

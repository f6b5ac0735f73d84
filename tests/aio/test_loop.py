"""The asyncio loop that lives inside trio, on its own: scheduling, bounds,
cancellation both ways."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref

import pytest
import trio
import trio.lowlevel

from boxfiles._aio._loop import _BATCH, MAX_UNSENT, open_loop
from boxfiles._wire import IOV_MAX


async def test_timers_run_in_order_and_cancelled_ones_do_not_pile_up() -> None:
    fired: list[int] = []
    async with open_loop() as loop:
        for i in (3, 1, 2):
            loop.call_later(i / 100, fired.append, i)
        # Every call with a deadline leaves a cancelled timer behind.
        for _ in range(10 * _BATCH):
            loop.call_later(3600, fired.append, -1).cancel()
        assert len(loop._timers) <= 2 * _BATCH + 3
        await trio.sleep(0.1)
    assert fired == [1, 2, 3]


async def test_an_asyncio_coroutine_is_cancelled_with_its_trio_caller() -> None:
    events: list[str] = []

    async def sleeper() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    async with open_loop() as loop:
        with trio.move_on_after(0.05):
            await loop.run_asyncio(sleeper())
        # Cancelled and finished before run_asyncio gave trio.Cancelled back.
        assert events == ["cancelled"]
        assert asyncio.all_tasks(loop) == set()


async def test_a_trio_function_is_cancelled_with_its_asyncio_awaiter() -> None:
    events: list[str] = []

    async def trio_side() -> None:
        try:
            await trio.sleep_forever()
        finally:
            events.append("trio side ended")

    async def awaiter() -> None:
        await asyncio.get_running_loop().run_trio(trio_side)  # type: ignore[attr-defined]

    async with open_loop() as loop:
        task = loop.create_task(awaiter())
        await trio.sleep(0.01)
        task.cancel()
        with trio.fail_after(5):
            while not task.done():
                await trio.sleep(0.01)
        assert task.cancelled()
        assert events == ["trio side ended"]


async def test_errors_cross_both_ways_unchanged() -> None:
    async def fails() -> None:
        raise KeyError("aio")

    async def trio_fails() -> None:
        raise ValueError("trio")

    async def awaits_trio() -> None:
        await asyncio.get_running_loop().run_trio(trio_fails)  # type: ignore[attr-defined]

    async with open_loop() as loop:
        with pytest.raises(KeyError, match="aio"):
            await loop.run_asyncio(fails())
        with pytest.raises(ValueError, match="trio"):
            await loop.run_asyncio(awaits_trio())


async def test_leaving_the_block_ends_every_asyncio_task() -> None:
    async with open_loop() as loop:
        task = loop.create_task(asyncio.sleep(3600))
    assert task.cancelled()
    assert loop.is_closed()


async def test_a_cancelled_timer_lets_go_of_what_its_callback_reaches() -> None:
    class Payload:
        def __call__(self) -> None:
            raise AssertionError("cancelled: never called")

    async with open_loop() as loop:
        payload = Payload()
        alive = weakref.ref(payload)
        loop.call_later(3600, payload).cancel()
        del payload
        gc.collect()
        assert alive() is None


async def test_a_peer_that_reads_nothing_is_dropped_past_the_unsent_bound() -> None:
    lost: list[BaseException | None] = []

    class Protocol(asyncio.Protocol):
        def connection_lost(self, exc: BaseException | None) -> None:
            lost.append(exc)

    ours, theirs = socket.socketpair()
    with theirs:
        async with open_loop() as loop:
            transport, _ = loop._connect(ours, Protocol)
            with trio.fail_after(5):
                while not lost:
                    transport.write(b"x" * 65536)  # the peer never reads
                    await trio.lowlevel.checkpoint()
            assert transport.get_write_buffer_size() == 0
            assert isinstance(lost[0], ConnectionError)
            assert str(MAX_UNSENT) in str(lost[0])


async def test_more_pieces_than_one_system_call_takes_are_all_written() -> None:
    lost: list[BaseException | None] = []

    class Protocol(asyncio.Protocol):
        def connection_lost(self, exc: BaseException | None) -> None:
            lost.append(exc)

    pieces = [bytes([i % 251]) * 3 for i in range(3 * IOV_MAX)]
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    with theirs:
        async with open_loop() as loop:
            transport, _ = loop._connect(ours, Protocol)
            transport.writelines(pieces)
            got = bytearray()
            with trio.fail_after(5):
                while len(got) < 9 * IOV_MAX:
                    await trio.lowlevel.wait_readable(theirs)
                    got += theirs.recv(65536)
            assert not lost
            transport.close()
    assert bytes(got) == b"".join(pieces)

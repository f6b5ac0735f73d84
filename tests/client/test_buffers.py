"""Chunk buffers: one client's uploads share spares, and never wait on each other."""

from __future__ import annotations

import trio
import trio.testing

from boxfiles._chunks import POOL_SIZE, BufferPool, TransferBuffers

SIZE = 1024


async def test_an_upload_never_waits_on_another() -> None:
    # A server may leave some calls unread while it serves others: an upload
    # it reads must go on even when unread ones hold every spare.
    pool = BufferPool(limit=2)
    stalled = TransferBuffers(pool, SIZE)
    for _ in range(3):
        await stalled.take()  # its own and both spares, held for ever
    served = TransferBuffers(pool, SIZE)
    with trio.fail_after(5):
        own = await served.take()  # no spare left, but a buffer of its own
        for _ in range(3):
            served.give_back(own)
            assert await served.take() is own


async def blocked_take(upload: TransferBuffers, release: bytearray) -> bytearray:
    """Take a buffer that must wait until ``release`` is given back."""
    got: list[bytearray] = []

    async def take() -> None:
        got.append(await upload.take())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [], "took a buffer it should have waited for"
        upload.give_back(release)
    return got[0]


async def test_a_second_chunk_waits_for_its_own_upload() -> None:
    upload = TransferBuffers(BufferPool(limit=0), SIZE)
    first = await upload.take()
    assert await blocked_take(upload, first) is first  # no spares: it waits for its own


async def test_at_most_pool_size_per_upload() -> None:
    upload = TransferBuffers(BufferPool(limit=100), SIZE)
    held = [await upload.take() for _ in range(POOL_SIZE)]
    assert await blocked_take(upload, held[-1]) is held[-1]


async def test_spares_in_dropped_chunks_count_as_returned() -> None:
    pool = BufferPool(limit=2)
    failed = TransferBuffers(pool, SIZE)
    for _ in range(3):
        await failed.take()  # chunks dropped with a failed upload, never given back
    failed.close()
    upload = TransferBuffers(pool, SIZE)
    with trio.fail_after(5):
        buffers = [await upload.take() for _ in range(3)]  # both spares are back
    assert len({id(b) for b in buffers}) == 3


async def test_buffers_are_reused_and_an_idle_pool_keeps_none() -> None:
    pool = BufferPool(limit=16)
    running = TransferBuffers(pool, SIZE)
    await running.take()
    first = TransferBuffers(pool, SIZE)
    mine = await first.take()
    first.give_back(mine)
    first.close()
    second = TransferBuffers(pool, SIZE)
    assert await second.take() is mine  # another upload was running: kept
    second.give_back(mine)
    second.close()
    running.close()
    last = TransferBuffers(pool, SIZE)
    assert await last.take() is not mine  # nothing was running: freed

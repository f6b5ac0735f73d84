"""Soak: many transfers with random faults, then resources are back where they
started. Not in the default run: ``nox -s soak`` (or ``pytest -m soak``).

Tolerances: file descriptors and threads exactly as before (trio's idle
worker-thread cache aside, see conftest); RSS (after malloc_trim) within
SOAK_RSS_SLACK of where it started.
"""

from __future__ import annotations

import collections
import gc
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

import boxfiles
from boxfiles import Status
from boxfiles._aio import open_channel
from boxfiles._target import parse_target
from boxfiles.testing import (
    DropConnection,
    Fault,
    FaultServer,
    Reject,
    ReplyFailure,
    Stall,
    open_fault_server,
)

from .helpers.archives import files
from .helpers.checks import Leaks, rss
from .helpers.raw import stall_download, stall_upload

pytestmark = pytest.mark.soak

MiB = 1024 * 1024
SEQUENTIAL = 500
CONCURRENT = 64
SOAK_RSS_SLACK = 8 * MiB
TRIO_THREAD_IDLE = 10  # seconds an idle trio worker thread is kept
# The client's deadline, which is how a stalled call ends: short when calls
# run one at a time, longer when 64 share two cores.
TIMEOUT = 1.0
CONCURRENT_TIMEOUT = 5.0
# The server's: longer than a healthy call ever waits on its client here,
# and what ends the stalled clients of the last round.
IDLE_TIMEOUT = 3.0

FAULTS: list[
    tuple[Callable[[], Fault] | None, type[Exception] | tuple[type[Exception], ...] | None]
] = [
    # Healthy calls and quick faults are weighted up: a stall lasts TIMEOUT.
    *[(None, None)] * 4,
    *[(lambda: Reject(Status.PERMISSION_DENIED, after_chunks=1), boxfiles.PermissionDenied)] * 2,
    *[(lambda: ReplyFailure("no"), boxfiles.UploadRejected)] * 2,
    *[(lambda: DropConnection(after_chunks=1), (boxfiles.IncompleteTransfer, boxfiles.Unavailable))]
    * 2,
    (lambda: Stall(after_chunks=1), boxfiles.DeadlineExceeded),
]
DOWNLOAD_FAULTS = [f for f in FAULTS if not (f[0] and isinstance(f[0](), ReplyFailure))]


Expected = type[Exception] | tuple[type[Exception], ...] | None


def outcome_matches(outcome: type[Exception] | None, expected: Expected) -> bool:
    if expected is None or outcome is None:
        return outcome is expected
    return issubclass(outcome, expected)


def pick_fault(rng: random.Random, upload: bool) -> tuple[Fault | None, Expected]:
    make, expected = rng.choice(FAULTS if upload else DOWNLOAD_FAULTS)
    return (make() if make else None), expected


def queue(server: FaultServer, upload: bool, fault: Fault | None) -> None:
    if fault is not None:
        (server.fail_next_upload if upload else server.fail_next_download)(fault)


async def transfer(
    server: FaultServer, upload: bool, size: int, work: Path, n: int, deadline: float = TIMEOUT
) -> type[Exception] | None:
    """One upload or download in a client of its own; the error class or None."""
    async with boxfiles.open_client(server.target, timeout=deadline) as client:
        try:
            if upload:
                source = work / f"in-{n}.tar"
                source.write_bytes(files(**{"f": os.urandom(size)}))
                try:
                    await client.upload_tar(source, f"/up/{n}/f", chunk_size=65536)
                finally:
                    source.unlink()
            else:
                await client.download_tar("/seed.bin", work / f"out-{n}.tar")
                (work / f"out-{n}.tar").unlink()
        except boxfiles.FilesError as exc:
            return type(exc)
    return None


async def ended_by_idle_timeout(stall: Awaitable[None]) -> None:
    with pytest.raises(boxfiles.DeadlineExceeded, match="idle timeout"):
        await stall


async def stalled_clients(server: FaultServer) -> None:
    """Clients that stall (an upload after a header, a download before its
    request) until the server's idle timeout ends them."""
    with trio.fail_after(IDLE_TIMEOUT + 10):
        async with open_channel(parse_target(server.target)) as channel:
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(ended_by_idle_timeout, stall_upload(channel, True))
                    stall = stall_download(channel, False, [], IDLE_TIMEOUT + 1)
                    nursery.start_soon(ended_by_idle_timeout, stall)


async def test_soak(tmp_path: Path, sock_dir: Path) -> None:
    root = tmp_path / "box"
    root.mkdir()
    (root / "seed.bin").write_bytes(os.urandom(300_000))
    work = tmp_path / "work"
    work.mkdir()
    rng = random.Random(1234)
    seen: collections.Counter[str] = collections.Counter()
    async with open_fault_server(
        root, f"unix:{sock_dir}/soak.sock", chunk_size=65536, idle_timeout=IDLE_TIMEOUT
    ) as server:
        # Warm up with one round of each pattern, so the baseline already
        # holds what is made once and kept (the allocator's high-water mark
        # after 64 transfers at once, lazily made codecs).
        async with trio.open_nursery() as nursery:
            for n in range(CONCURRENT):
                nursery.start_soon(transfer, server, n % 2 == 0, 70_000, work, -1 - n)
        gc.collect()
        await trio.sleep(TRIO_THREAD_IDLE + 1)
        leaks = Leaks()
        baseline = rss()
        for n in range(SEQUENTIAL):
            upload = rng.random() < 0.5
            fault, expected = pick_fault(rng, upload)
            queue(server, upload, fault)
            outcome = await transfer(server, upload, rng.randrange(1, 300_000), work, n)
            assert outcome_matches(outcome, expected), (n, fault, outcome)
            seen[type(fault).__name__] += 1
        sequential_grown = rss() - baseline
        # Concurrent: faults queue per kind and go to calls in arrival order,
        # so compare what happened with what was queued as multisets.
        plans = [(rng.random() < 0.5, rng) for _ in range(CONCURRENT)]
        faults = [(upload, *pick_fault(r, upload)) for upload, r in plans]
        for upload, fault, _ in faults:
            queue(server, upload, fault)
        outcomes: list[tuple[bool, type[Exception] | None]] = []

        async def run(n: int, upload: bool) -> None:
            outcome = await transfer(server, upload, 70_000, work, 10_000 + n, CONCURRENT_TIMEOUT)
            outcomes.append((upload, outcome))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for n, (upload, _, _) in enumerate(faults):
                    nursery.start_soon(run, n, upload)
        for kind in (True, False):
            queued = [e for up, _, e in faults if up is kind]
            got = [o for up, o in outcomes if up is kind]
            unmatched = list(got)
            for e in queued:
                match = [o for o in unmatched if outcome_matches(o, e)]
                assert match, f"expected {e}, got {got} for {queued}"
                unmatched.remove(match[0])
            assert unmatched == []
        await stalled_clients(server)
        with trio.fail_after(10):
            for call in server.calls:
                await call.finished.wait()
        gc.collect()
        await leaks.check()
        # trio's idle worker threads (one per concurrent file read at the
        # peak) linger 10 s with their stacks and malloc arenas; let them go.
        await trio.sleep(TRIO_THREAD_IDLE + 1)
        grown = rss() - baseline
        print(
            f"soak: RSS grew {sequential_grown / MiB:.1f} MiB (sequential), {grown / MiB:.1f} MiB"
        )
    assert os.listdir(work) == []
    assert [p for p in root.rglob("*") if p.name.startswith(".boxfiles")] == []
    print(f"soak: faults {dict(seen)}; RSS grew {grown / MiB:.1f} MiB")
    assert grown < SOAK_RSS_SLACK
    assert len(seen) >= 4  # the faults really varied

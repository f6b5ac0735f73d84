"""The fault matrix for copy_in and copy_out: every declared fault at the
first, a middle and the last chunk; local faults (source changing under the
packer, destination not writable); caller faults (cancellation at each point,
a deadline shorter than the transfer). Each case checks the error class, that
nothing is half-written on either side, and that nothing leaks."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

import boxfiles
from boxfiles import Status
from boxfiles._proto.files_pb2 import DownloadRequest
from boxfiles.testing import (
    CallRecord,
    Corrupt,
    DropConnection,
    Fault,
    FaultServer,
    Reject,
    ReplyFailure,
    Slow,
    Stall,
    open_fault_server,
)

from ..helpers.checks import Leaks, assert_no_asyncio_tasks

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB  # the server's download chunks
PROMPT = 10.0  # generous guard for "promptly"; never a speed claim
TIMEOUT = 1.0  # the client's deadline, for faults that never answer
MTIME = 1_600_000_000_123_456_789  # fixed, so archives (PAX headers) are the same size every run

WHERE = ("first", "middle", "last")

# copy_in always packs into 1 MiB chunks (DEFAULT_CHUNK_SIZE, no parameter):
# about 2.5 MiB of tree makes three of them.
LOCAL_FILES = {"a.bin": 1000 * KiB, "b.bin": 1000 * KiB, "sub/c.bin": 500 * KiB}
# Download chunks are the server's chunk_size (64 KiB): about 210 KiB makes four.
BOX_FILES = {"x.bin": 70 * KiB, "y.bin": 70 * KiB, "sub/z.bin": 70 * KiB}


Listing = dict[str, tuple[object, ...]]


def listing(root: Path) -> Listing:
    """Every entry under root (not root itself): kind, mode bits, size,
    content hash or link target, mtime in ns."""
    found: Listing = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[str(path.relative_to(root))] = ("link", os.readlink(path), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                mode = stat.S_IMODE(st.st_mode)
                found[str(path.relative_to(root))] = ("dir", mode, st.st_mtime_ns)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                mode = stat.S_IMODE(st.st_mode)
                found[str(path.relative_to(root))] = (
                    "file",
                    mode,
                    st.st_size,
                    digest,
                    st.st_mtime_ns,
                )
    return found


def make_tree(base: Path, files: dict[str, int]) -> Path:
    base.mkdir(parents=True)
    for name, size in files.items():
        path = base / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(size))
    (base / "sub" / "empty").mkdir()
    (base / "sub" / "link").symlink_to("../" + next(iter(files)))
    for path in [*sorted(base.rglob("*"), key=lambda p: -len(p.parts)), base]:
        os.utime(path, ns=(MTIME, MTIME), follow_symlinks=False)
    return base


def no_litter(path: Path) -> None:
    names = [p.name for p in path.rglob("*")]
    assert not [n for n in names if n.startswith(".boxfiles-")], names


@dataclass
class Box:
    server: FaultServer
    root: Path  # the container root; holds /src for copy_out
    tree: Path  # the local tree for copy_in
    out: Path  # the empty local directory copy_out writes into
    up_chunks: int  # chunks copy_in sends for tree
    up_bytes: int  # the size of the archive copy_in sends for tree
    down_chunks: int  # chunks the server sends for /src
    down_bytes: int  # the size of the archive of /src

    @property
    def transfers(self) -> list[CallRecord]:
        """The calls that move data: copy_in first asks what its destination
        is, with a download of it that it resets at once."""
        return [c for c in self.server.calls if not _is_probe(c)]

    @property
    def call(self) -> CallRecord:
        return self.transfers[-1]


def _is_probe(call: CallRecord) -> bool:
    # Until its request has arrived, a download could be either.
    if call.method != "download":
        return False
    request = call.messages[0] if call.messages else None
    return not isinstance(request, DownloadRequest) or request.src_path != "/src"


class _Discard:
    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()


_measured: dict[str, int] = {}


async def _measure(server: FaultServer, tree: Path) -> tuple[int, int, int, int]:
    # Count the chunks each direction takes, once: the trees are the same
    # size every time (fixed sizes and mtimes). success=false writes nothing.
    if not _measured:
        async with boxfiles.open_client(server.target) as client:
            server.fail_next_upload(ReplyFailure())
            with pytest.raises(boxfiles.UploadRejected):
                await client.copy_in(tree, "/probe")
            await client.download_tar("/src", _Discard())
        up, down = (c for c in server.calls if not _is_probe(c))
        _measured.update(up=up.chunks, up_bytes=up.bytes, down=down.chunks, down_bytes=down.bytes)
        server.calls.clear()
    assert _measured["up"] >= 3
    assert _measured["down"] >= 3
    return _measured["up"], _measured["up_bytes"], _measured["down"], _measured["down_bytes"]


@pytest.fixture
async def box(tmp_path: Path, sock_dir: Path) -> AsyncIterator[Box]:
    root = tmp_path / "box"
    make_tree(root / "src", BOX_FILES)
    tree = make_tree(tmp_path / "local" / "tree", LOCAL_FILES)
    out = tmp_path / "out"
    out.mkdir()
    async with open_fault_server(root, f"unix:{sock_dir}/f.sock", chunk_size=CHUNK) as server:
        yield Box(server, root, tree, out, *await _measure(server, tree))


async def finished(call: CallRecord) -> None:
    with trio.fail_after(PROMPT):
        await call.finished.wait()


# ------------------------------------------------------------- the matrix


def _after(where: str, total: int) -> int:
    return {"first": 0, "middle": 1, "last": total}[where]


def _after_bytes(where: str, total: int) -> int:
    # Not chunk-aligned in the middle, so the by-bytes count is exercised.
    return {"first": 0, "middle": total // 2, "last": total}[where]


def upload_fault(kind: str, where: str, box: Box) -> Fault:
    after = _after(where, box.up_chunks)
    if kind == "reject":
        return Reject(Status.PERMISSION_DENIED, after_chunks=after)
    if kind == "reject-bytes":
        return Reject(Status.RESOURCE_EXHAUSTED, after_bytes=_after_bytes(where, box.up_bytes))
    if kind == "stall":
        return Stall(after_chunks=after)
    assert kind == "drop"
    return DropConnection(after_chunks=after)


COPY_IN_EXPECTED: dict[str, type[Exception] | tuple[type[Exception], ...]] = {
    "reject": boxfiles.PermissionDenied,
    "reject-bytes": boxfiles.ResourceExhausted,
    "stall": boxfiles.DeadlineExceeded,
    "drop": (boxfiles.IncompleteTransfer, boxfiles.Unavailable),
}


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("kind", sorted(COPY_IN_EXPECTED))
async def test_copy_in_under_fault(box: Box, kind: str, where: str) -> None:
    before = listing(box.root)
    leaks = Leaks()
    box.server.fail_next_upload(upload_fault(kind, where, box))
    async with boxfiles.open_client(box.server.target, timeout=TIMEOUT) as client:
        with trio.fail_after(PROMPT), pytest.raises(COPY_IN_EXPECTED[kind]):
            await client.copy_in(box.tree, "/dest")
        assert_no_asyncio_tasks()
    await finished(box.call)
    await leaks.check()
    assert listing(box.root) == before  # nothing half-written, no staging left
    no_litter(box.root)


async def test_copy_in_success_false(box: Box) -> None:
    # The server reads the whole stream, then answers success=false.
    before = listing(box.root)
    leaks = Leaks()
    box.server.fail_next_upload(ReplyFailure("quota"))
    async with boxfiles.open_client(box.server.target, timeout=TIMEOUT) as client:
        with trio.fail_after(PROMPT), pytest.raises(boxfiles.UploadRejected, match="quota"):
            await client.copy_in(box.tree, "/dest")
        assert_no_asyncio_tasks()
    await finished(box.call)
    await leaks.check()
    assert box.call.client_ended
    assert box.call.chunks == box.up_chunks
    assert listing(box.root) == before


async def test_copy_in_slow_server_succeeds(box: Box) -> None:
    leaks = Leaks()
    box.server.fail_next_upload(Slow(0.05))
    async with boxfiles.open_client(box.server.target, timeout=PROMPT) as client:
        with trio.fail_after(PROMPT):
            await client.copy_in(box.tree, "/dest")
        assert_no_asyncio_tasks()
    await finished(box.call)
    await leaks.check()
    assert listing(box.root / "dest") == listing(box.tree)
    no_litter(box.root)


def download_fault(kind: str, where: str, box: Box) -> Fault:
    after = _after(where, box.down_chunks)
    if kind == "reject":
        return Reject(Status.NOT_FOUND, after_chunks=after)
    if kind == "reject-bytes":
        return Reject(Status.PERMISSION_DENIED, after_bytes=_after_bytes(where, box.down_bytes))
    if kind == "stall":
        return Stall(after_chunks=after)
    assert kind == "drop"
    return DropConnection(after_chunks=after)


COPY_OUT_EXPECTED: dict[str, type[Exception] | tuple[type[Exception], ...]] = {
    "reject": boxfiles.NotFound,
    "reject-bytes": boxfiles.PermissionDenied,
    "stall": boxfiles.DeadlineExceeded,
    "drop": (boxfiles.IncompleteTransfer, boxfiles.Unavailable),
}


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("kind", sorted(COPY_OUT_EXPECTED))
async def test_copy_out_under_fault(box: Box, kind: str, where: str) -> None:
    before = listing(box.root)
    leaks = Leaks()
    box.server.fail_next_download(download_fault(kind, where, box))
    async with boxfiles.open_client(box.server.target, timeout=TIMEOUT) as client:
        with trio.fail_after(PROMPT), pytest.raises(COPY_OUT_EXPECTED[kind]):
            await client.copy_out("/src", box.out / "src")
        assert_no_asyncio_tasks()
    await finished(box.call)
    await leaks.check()
    if where == "last" and kind != "drop":
        # The whole archive went out before the fault, and still nothing is
        # placed: only the server's OK makes copy_out move staging into place.
        assert box.call.chunks == box.down_chunks
    assert list(box.out.iterdir()) == []  # nothing placed, no .boxfiles-*.part
    assert listing(box.root) == before


async def test_copy_out_corrupt_archive_is_unsafe(box: Box) -> None:
    leaks = Leaks()
    box.server.fail_next_download(Corrupt())
    async with boxfiles.open_client(box.server.target, timeout=TIMEOUT) as client:
        with trio.fail_after(PROMPT), pytest.raises(boxfiles.UnsafeArchive, match="corrupt"):
            await client.copy_out("/src", box.out / "src")
        assert_no_asyncio_tasks()
    await finished(box.call)
    await leaks.check()
    assert list(box.out.iterdir()) == []


async def test_copy_out_slow_server_succeeds(box: Box) -> None:
    leaks = Leaks()
    box.server.fail_next_download(Slow(0.05))
    async with boxfiles.open_client(box.server.target, timeout=PROMPT) as client:
        with trio.fail_after(PROMPT):
            await client.copy_out("/src", box.out / "src")
        assert_no_asyncio_tasks()
    await finished(box.call)
    await leaks.check()
    assert [p.name for p in box.out.iterdir()] == ["src"]
    assert listing(box.out / "src") == listing(box.root / "src")


# ------------------------------------------------------------ local faults


async def wait_for(condition: Callable[[], bool]) -> None:
    with trio.fail_after(PROMPT):
        while not condition():
            await trio.sleep(0.002)


@pytest.mark.parametrize("change", ["vanish", "shrink", "fifo"])
async def test_copy_in_source_changes_mid_stream(box: Box, tmp_path: Path, change: str) -> None:
    # A sparse 64 MiB file is far more than the client buffers ahead (HTTP/2
    # window plus a few 1 MiB chunks), and the slow server keeps the packer
    # inside it while the test changes the tree.
    tree = tmp_path / "changing"
    tree.mkdir()
    with open(tree / "a-big", "wb") as f:
        f.truncate(64 * MiB)
    (tree / "z-victim").write_bytes(b"v" * 10_000)
    before = listing(box.root)
    leaks = Leaks()
    box.server.fail_next_upload(Slow(0.01))
    async with boxfiles.open_client(box.server.target) as client:

        async def change_tree() -> None:
            await wait_for(lambda: bool(box.transfers) and box.call.chunks >= 1)
            if change in ("vanish", "fifo"):  # a later entry, listed but not yet packed
                (tree / "z-victim").unlink()
                if change == "fifo":  # its open must not wait for a writer
                    os.mkfifo(tree / "z-victim")
            else:  # the file being read, cut short below where the packer can be
                os.truncate(tree / "a-big", 32 * MiB)

        match = {
            "vanish": "z-victim",
            "fifo": "z-victim: it (is a fifo|was replaced)",
            "shrink": "a-big: it shrank",
        }[change]
        with trio.fail_after(PROMPT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(change_tree)
                with pytest.raises(boxfiles.LocalIOError, match=match):
                    await client.copy_in(tree, "/dest")
        assert_no_asyncio_tasks()
    await finished(box.call)
    await leaks.check()
    assert not box.call.client_ended  # reset, never ended: no truncated archive taken as whole
    assert box.call.reset
    assert box.call.bytes < 64 * MiB
    assert listing(box.root) == before
    no_litter(box.root)


async def test_copy_out_destination_parent_is_a_file(box: Box) -> None:
    # We run as root, so permission bits stop nothing: a destination whose
    # parent is a regular file (ENOTDIR) is the unwritable destination here.
    (box.out / "afile").write_bytes(b"a")
    before = listing(box.out)
    leaks = Leaks()
    async with boxfiles.open_client(box.server.target, timeout=TIMEOUT) as client:
        with trio.fail_after(PROMPT), pytest.raises(boxfiles.LocalIOError, match="afile"):
            await client.copy_out("/src", box.out / "afile" / "src")
        assert_no_asyncio_tasks()
    await leaks.check()
    assert box.server.calls == []  # refused before asking the server
    assert listing(box.out) == before


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail with EFBIG (process-wide, kernel-enforced);
    SIGXFSZ is ignored so that the write fails instead of killing us."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


async def test_copy_out_write_fails_mid_stream(box: Box) -> None:
    # A full disk, as near as a test without mount rights gets: a file-size
    # limit makes the extractor's writes fail part-way through the download.
    # The file (sparse) is far more than is in flight, so the server cannot
    # have finished sending when the client gives up.
    with open(box.root / "src" / "big.bin", "wb") as f:
        f.truncate(32 * MiB)
    leaks = Leaks()
    async with boxfiles.open_client(box.server.target, timeout=PROMPT) as client:
        with (
            file_size_limit(256 * KiB),
            trio.fail_after(PROMPT),
            pytest.raises(boxfiles.LocalIOError, match="File too large"),
        ):
            await client.copy_out("/src", box.out / "src")
        assert_no_asyncio_tasks()
    await finished(box.call)
    await leaks.check()
    assert box.call.reset  # the download was abandoned, not read to the end
    assert list(box.out.iterdir()) == []


# ----------------------------------------------------------- caller faults


async def cancel_when(transfer: Callable[[], Awaitable[None]], ready: Callable[[], bool]) -> None:
    """Run ``transfer``; cancel it once ``ready()``; it must end cancelled."""
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            await transfer()

    with trio.fail_after(PROMPT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await wait_for(ready)
            scope.cancel()
    assert scope.cancelled_caught


def _started(box: Box) -> Callable[[], bool]:
    return lambda: bool(box.transfers)


def _took(box: Box, chunks: int) -> Callable[[], bool]:
    return lambda: bool(box.transfers) and box.call.chunks >= chunks


async def test_copy_in_cancelled_before_it_starts(box: Box) -> None:
    before = listing(box.root)
    leaks = Leaks()
    async with boxfiles.open_client(box.server.target) as client:
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.copy_in(box.tree, "/dest")
        assert scope.cancelled_caught
        assert_no_asyncio_tasks()
    await leaks.check()
    assert box.server.calls == []
    assert listing(box.root) == before


CANCEL_POINTS = ("before-first-chunk", "mid-stream", "awaiting-response")


@pytest.mark.parametrize("point", CANCEL_POINTS)
async def test_copy_in_cancelled(box: Box, point: str) -> None:
    # before-first-chunk: the call is open but the server has taken no chunk;
    # awaiting-response: it has taken them all and never answers.
    cases: dict[str, tuple[Fault, Callable[[], bool]]] = {
        "before-first-chunk": (Stall(after_chunks=0), _started(box)),
        "mid-stream": (Slow(0.2), _took(box, 1)),
        "awaiting-response": (Stall(after_chunks=box.up_chunks), _took(box, box.up_chunks)),
    }
    fault, ready = cases[point]
    before = listing(box.root)
    leaks = Leaks()
    box.server.fail_next_upload(fault)
    async with boxfiles.open_client(box.server.target) as client:
        await cancel_when(lambda: client.copy_in(box.tree, "/dest"), ready)
        await finished(box.call)
        assert_no_asyncio_tasks()
    await leaks.check()
    assert box.call.reset  # the server saw a reset, not the end of the stream
    assert not box.call.client_ended
    if point == "before-first-chunk":
        assert box.call.chunks == 0
    elif point == "mid-stream":
        assert box.call.chunks < box.up_chunks
    else:
        assert box.call.chunks == box.up_chunks
    assert listing(box.root) == before
    no_litter(box.root)


async def test_copy_in_caller_deadline_shorter_than_transfer(box: Box) -> None:
    before = listing(box.root)
    leaks = Leaks()
    box.server.fail_next_upload(Slow(0.3))  # three chunks: about 1 s
    async with boxfiles.open_client(box.server.target) as client:
        with pytest.raises(trio.TooSlowError), trio.fail_after(0.4):
            await client.copy_in(box.tree, "/dest")
        await finished(box.call)
        assert_no_asyncio_tasks()
    await leaks.check()
    assert box.call.reset
    assert listing(box.root) == before
    no_litter(box.root)


async def test_copy_out_cancelled_before_it_starts(box: Box) -> None:
    leaks = Leaks()
    async with boxfiles.open_client(box.server.target) as client:
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.copy_out("/src", box.out / "src")
        assert scope.cancelled_caught
        assert_no_asyncio_tasks()
    await leaks.check()
    assert box.server.calls == []
    assert list(box.out.iterdir()) == []


@pytest.mark.parametrize("point", CANCEL_POINTS)
async def test_copy_out_cancelled(box: Box, point: str) -> None:
    # awaiting-response: every chunk has been sent but the status never comes.
    cases: dict[str, tuple[Fault, Callable[[], bool]]] = {
        "before-first-chunk": (Stall(after_chunks=0), _started(box)),
        "mid-stream": (Slow(0.1), _took(box, 1)),
        "awaiting-response": (Stall(after_chunks=box.down_chunks), _took(box, box.down_chunks)),
    }
    fault, ready = cases[point]
    leaks = Leaks()
    box.server.fail_next_download(fault)
    async with boxfiles.open_client(box.server.target) as client:
        await cancel_when(lambda: client.copy_out("/src", box.out / "src"), ready)
        await finished(box.call)
        assert_no_asyncio_tasks()
    await leaks.check()
    assert box.call.reset
    assert list(box.out.iterdir()) == []  # nothing placed, staging removed


async def test_copy_out_caller_deadline_shorter_than_transfer(box: Box) -> None:
    leaks = Leaks()
    box.server.fail_next_download(Slow(0.1))  # four chunks: about 0.4 s
    async with boxfiles.open_client(box.server.target) as client:
        with pytest.raises(trio.TooSlowError), trio.fail_after(0.2):
            await client.copy_out("/src", box.out / "src")
        await finished(box.call)
        assert_no_asyncio_tasks()
    await leaks.check()
    assert box.call.reset
    assert list(box.out.iterdir()) == []

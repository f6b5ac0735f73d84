"""The fault matrix: every declared fault, at the first, a middle and the last
chunk, against upload_tar and download_tar. Each case checks the error class,
that nothing is half-written on either side, and that nothing leaks."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

import boxfiles
from boxfiles import Status
from boxfiles.testing import (
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

from ..helpers.archives import BytesReader, files
from ..helpers.checks import Leaks, assert_no_asyncio_tasks

KiB = 1024
CHUNK = 64 * KiB
PROMPT = 10.0  # generous guard for "promptly"; never a speed claim
TIMEOUT = 1.0  # the client's deadline, for faults that never answer

PAYLOAD = os.urandom(150 * KiB)
ARCHIVE = files(**{"payload.bin": PAYLOAD})  # three 64 KiB upload chunks
UPLOAD_CHUNKS = -(-len(ARCHIVE) // CHUNK)
DOWNLOAD_CHUNKS = 3  # the server packs payload.bin into 64 KiB chunks

WHERE = {"first": 0, "middle": 1}


def listing(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """Every entry under root: type, size, mode bits and content hash."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if path.is_symlink() else "file"
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if kind == "file" else ""
            found[str(path.relative_to(root))] = (
                kind,
                st.st_size if kind == "file" else 0,
                stat.S_IMODE(st.st_mode),
                digest,
            )
    return found


@pytest.fixture
async def faults(tmp_path: Path, sock_dir: Path) -> AsyncIterator[FaultServer]:
    root = tmp_path / "box"
    root.mkdir()
    (root / "src.bin").write_bytes(PAYLOAD)
    async with open_fault_server(root, f"unix:{sock_dir}/f.sock", chunk_size=CHUNK) as server:
        yield server


def upload_cases() -> list[object]:
    cases: list[object] = []
    for where, after in [*WHERE.items(), ("last", UPLOAD_CHUNKS)]:
        cases += [
            pytest.param(
                Reject(Status.PERMISSION_DENIED, after_chunks=after),
                boxfiles.PermissionDenied,
                id=f"reject-{where}",
            ),
            pytest.param(
                Reject(Status.RESOURCE_EXHAUSTED, after_bytes=min(after * CHUNK, len(ARCHIVE))),
                boxfiles.ResourceExhausted,
                id=f"reject-bytes-{where}",
            ),
            pytest.param(Stall(after_chunks=after), boxfiles.DeadlineExceeded, id=f"stall-{where}"),
            pytest.param(
                DropConnection(after_chunks=after),
                (boxfiles.IncompleteTransfer, boxfiles.Unavailable),
                id=f"drop-{where}",
            ),
        ]
    cases += [
        pytest.param(ReplyFailure("quota"), boxfiles.UploadRejected, id="success-false"),
        pytest.param(Slow(0.02), None, id="slow"),
    ]
    return cases


@pytest.mark.parametrize(("fault", "expected"), upload_cases())
async def test_upload_tar_under_fault(
    faults: FaultServer, tmp_path: Path, fault: Fault, expected: type[Exception] | None
) -> None:
    source = tmp_path / "in.tar"
    source.write_bytes(ARCHIVE)
    before = listing(faults.root)
    leaks = Leaks()
    faults.fail_next_upload(fault)
    async with boxfiles.open_client(faults.target, timeout=TIMEOUT) as client:
        with trio.fail_after(PROMPT):
            if expected is None:
                await client.upload_tar(source, "/dest/payload.bin", chunk_size=CHUNK)
            else:
                with pytest.raises(expected):
                    await client.upload_tar(source, "/dest/payload.bin", chunk_size=CHUNK)
        assert_no_asyncio_tasks()
    (call,) = faults.calls
    with trio.fail_after(PROMPT):
        await call.finished.wait()
    await leaks.check()
    if expected is None:
        assert (faults.root / "dest" / "payload.bin").read_bytes() == PAYLOAD
    else:
        assert listing(faults.root) == before  # nothing half-written, no staging


def download_cases() -> list[object]:
    cases: list[object] = []
    for where, after in [*WHERE.items(), ("last", DOWNLOAD_CHUNKS)]:
        cases += [
            pytest.param(
                Reject(Status.NOT_FOUND, after_chunks=after), boxfiles.NotFound, id=f"fail-{where}"
            ),
            pytest.param(Stall(after_chunks=after), boxfiles.DeadlineExceeded, id=f"stall-{where}"),
            pytest.param(
                DropConnection(after_chunks=after),
                (boxfiles.IncompleteTransfer, boxfiles.Unavailable),
                id=f"drop-{where}",
            ),
        ]
    cases.append(pytest.param(Slow(0.02), None, id="slow"))
    return cases


@pytest.mark.parametrize(("fault", "expected"), download_cases())
async def test_download_tar_under_fault(
    faults: FaultServer, tmp_path: Path, fault: Fault, expected: type[Exception] | None
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    leaks = Leaks()
    faults.fail_next_download(fault)
    async with boxfiles.open_client(faults.target, timeout=TIMEOUT) as client:
        with trio.fail_after(PROMPT):
            if expected is None:
                await client.download_tar("/src.bin", out / "src.tar")
            else:
                with pytest.raises(expected):
                    await client.download_tar("/src.bin", out / "src.tar")
        assert_no_asyncio_tasks()
    await leaks.check()
    if expected is None:
        assert [p.name for p in out.iterdir()] == ["src.tar"]
    else:
        assert list(out.iterdir()) == []  # nothing half-written, no temp file


async def test_corrupt_download_is_stored_as_sent(faults: FaultServer, tmp_path: Path) -> None:
    # download_tar stores bytes, it does not parse them: corruption arrives
    # intact for the caller to detect (copy_out does parse, and refuses).
    faults.fail_next_download(Corrupt())
    async with boxfiles.open_client(faults.target) as client:
        await client.download_tar("/src.bin", tmp_path / "src.tar")
    data = (tmp_path / "src.tar").read_bytes()
    assert faults.calls[0].bytes == len(data)
    assert PAYLOAD not in data


async def test_records_show_the_wire(faults: FaultServer) -> None:
    faults.fail_next_upload(ReplyFailure(None))
    async with boxfiles.open_client(faults.target) as client:
        with pytest.raises(boxfiles.UploadRejected, match="upload failed"):
            await client.upload_tar(BytesReader(ARCHIVE), "/d", chunk_size=CHUNK, container_id="")
    (call,) = faults.calls
    assert call.sizes == [len(ARCHIVE[i : i + CHUNK]) for i in range(0, len(ARCHIVE), CHUNK)]
    assert call.client_ended
    assert not call.reset
    first, *rest = call.messages
    assert first.dest_path == "/d"  # type: ignore[union-attr]
    assert all(m.dest_path == "" for m in rest)  # type: ignore[union-attr]


async def test_faults_are_declared_per_call(faults: FaultServer, tmp_path: Path) -> None:
    faults.fail_next_upload(Reject(Status.INVALID_ARGUMENT, after_chunks=0))
    async with boxfiles.open_client(faults.target) as client:
        with pytest.raises(boxfiles.InvalidArgument):
            await client.upload_tar(BytesReader(ARCHIVE), "/a/payload.bin")
        await client.upload_tar(BytesReader(ARCHIVE), "/b/payload.bin")
    assert [c.fault is None for c in faults.calls] == [False, True]
    assert (faults.root / "b" / "payload.bin").read_bytes() == PAYLOAD
    assert not (faults.root / "a").exists()


def test_fault_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Reject(Status.INTERNAL)
    with pytest.raises(ValueError, match="other than OK"):
        Reject(Status.OK, after_chunks=1)


async def test_wrong_direction_fault_is_refused(faults: FaultServer) -> None:
    with pytest.raises(TypeError, match="Corrupt is not an upload fault"):
        faults.fail_next_upload(Corrupt())
    with pytest.raises(TypeError, match="ReplyFailure is not a download fault"):
        faults.fail_next_download(ReplyFailure())


async def test_copy_in_sends_the_chunk_size_it_is_given(
    faults: FaultServer, tmp_path: Path
) -> None:
    src = tmp_path / "site"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(5 * CHUNK + 17))
    async with boxfiles.open_client(faults.target) as client:
        await client.copy_in(src, "/site", chunk_size=CHUNK)
        with pytest.raises(ValueError, match="chunk_size"):
            await client.copy_in(src, "/other", chunk_size=boxfiles.MAX_CHUNK_SIZE + 1)
    upload = next(c for c in faults.calls if c.method == "upload")
    assert max(upload.sizes) == CHUNK
    assert upload.sizes[:-1] == [CHUNK] * (len(upload.sizes) - 1)
    assert (faults.root / "site" / "big").read_bytes() == (src / "big").read_bytes()

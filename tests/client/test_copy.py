"""copy_in / copy_out over real gRPC: exact round trips, docker-cp placement,
hostile archives, failures and cancellation leaving nothing behind."""

from __future__ import annotations

import io
import itertools
import os
import stat
import tarfile
import time
from pathlib import Path

import pytest
import trio

import boxfiles
from boxfiles._aio import ServerCall
from boxfiles._client._progress import INTERVAL
from boxfiles._proto.files_pb2 import DownloadChunk, DownloadRequest, UploadChunk, UploadResponse
from boxfiles._tar._read import MAX_ENTRY_HEADER_BYTES

from ..helpers import tarshapes
from ..helpers.archives import archive, entry
from ..helpers.checks import Leaks, assert_no_asyncio_tasks
from ..helpers.scripted import Record, recv_all, scripted_server
from ..helpers.servers import serve_bytes
from ..helpers.trees import copy_listing

MiB = 1024 * 1024
PROMPT = 5.0  # a generous guard for "returns promptly"; never a speed claim

LONG = "L" * 200  # a 200-byte name: beyond ustar's 100, needs PAX
DEEP = "/".join(["d" * 60] * 6)  # a path beyond 255 bytes


def make_tree(base: Path, *, absolute_link: bool = True) -> Path:
    """A tree with every kind of thing a round trip must keep."""
    tree = base / "tree"
    tree.mkdir()
    (tree / "empty.txt").write_bytes(b"")
    (tree / "one").write_bytes(b"1")
    (tree / "big.bin").write_bytes(os.urandom(2 * MiB + 7))
    (tree / "script.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (tree / "script.sh").chmod(0o755)
    (tree / "secret").write_bytes(b"s")
    (tree / "secret").chmod(0o600)
    (tree / "readonly").write_bytes(b"r")
    (tree / "readonly").chmod(0o444)
    (tree / "empty dir").mkdir()
    (tree / "private").mkdir(mode=0o700)
    (tree / "private" / "x").write_bytes(b"x")
    (tree / "locked").mkdir()
    (tree / "locked" / "y").write_bytes(b"y")
    (tree / "héllo wörld ✓.txt").write_bytes("ünïcode".encode())
    (tree / "日本語").mkdir()
    (tree / "日本語" / "ファイル").write_bytes(b"jp")
    (tree / LONG).write_bytes(b"long")
    (tree / os.fsdecode(b"latin1-\xe9t\xe9")).write_bytes(b"not UTF-8")
    (tree / DEEP).mkdir(parents=True)
    (tree / DEEP / "leaf").write_bytes(b"deep")
    (tree / "rel-link").symlink_to("one")
    (tree / "dir-link").symlink_to("日本語")
    (tree / "dangling").symlink_to("no/such/thing")
    if absolute_link:
        (tree / "abs-link").symlink_to("/etc/hostname")
    os.link(tree / "one", tree / "hard-one")
    os.link(tree / "big.bin", tree / "日本語" / "hard-big")
    # mtimes with nanoseconds, set last (children change their parent's)
    for i, path in enumerate(sorted(tree.rglob("*"), key=lambda p: -len(p.parts))):
        ns = 1_600_000_000_123_456_789 + i * 1_000_000_007
        os.utime(path, ns=(ns, ns), follow_symlinks=False)
    (tree / "locked").chmod(0o555)
    return tree


def snapshot(path: Path) -> dict[str, tuple[object, ...]]:
    """copy_listing() without directory mtimes: making and removing the staging
    directory beside the destination touches its parent's."""
    return {
        rel: entry[:2] if entry[0] == "dir" else entry for rel, entry in copy_listing(path).items()
    }


# ---------------------------------------------------------------- round trips


async def test_round_trip_is_exact_through_a_verbatim_server(
    sock_dir: Path, tmp_path: Path
) -> None:
    """copy_in's archive, stored and sent back byte for byte by a scripted
    server, comes out as the very same tree (mtimes to the nanosecond)."""
    tree = make_tree(tmp_path)
    stored: list[bytes] = []

    async def keep(call: ServerCall[UploadChunk, UploadResponse], record: Record) -> None:
        await recv_all(call, record)
        stored.append(record.data)
        await call.send(UploadResponse(success=True))

    async def give_back(call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        await call.recv()
        data = stored[0]
        for i in range(0, len(data), MiB):
            await call.send(DownloadChunk(data=data[i : i + MiB], source_is_dir=i == 0))

    async with scripted_server(sock_dir, upload=keep, download=give_back) as srv:
        async with boxfiles.open_client(srv.target) as client:
            await client.copy_in(tree, "/t")
            await client.copy_out("/t/.", tmp_path / "out")
    first = srv.records[0].chunks[0]
    assert first.HasField("source_is_dir")
    assert first.source_is_dir
    assert copy_listing(tmp_path / "out") == copy_listing(tree)
    assert oct(stat.S_IMODE((tmp_path / "out").stat().st_mode)) == oct(
        stat.S_IMODE(tree.stat().st_mode)
    )


async def test_round_trip_through_the_reference_server(
    server: str, root: Path, tmp_path: Path
) -> None:
    """In, then out again, through the reference server: the same tree, mtimes
    to the nanosecond, in the box and back out."""
    tree = make_tree(tmp_path)
    async with boxfiles.open_client(server) as client:
        await client.copy_in(tree, "/box/t")
        await client.copy_out("/box/t", tmp_path / "out")
    assert copy_listing(root / "box" / "t") == copy_listing(tree)
    assert copy_listing(tmp_path / "out") == copy_listing(tree)


async def test_single_file_round_trip_and_placement(
    server: str, root: Path, tmp_path: Path
) -> None:
    src = tmp_path / "f.txt"
    src.write_bytes(b"content")
    src.chmod(0o640)
    async with boxfiles.open_client(server) as client:
        await client.copy_in(src, "/renamed.txt")
        (root / "dir").mkdir()
        await client.copy_in(src, "/dir")
        assert (root / "renamed.txt").read_bytes() == b"content"
        assert (root / "dir" / "f.txt").read_bytes() == b"content"
        await client.copy_out("/renamed.txt", tmp_path / "back.txt")
        (tmp_path / "into").mkdir()
        await client.copy_out("/renamed.txt", tmp_path / "into")
    assert (tmp_path / "back.txt").read_bytes() == b"content"
    assert stat.S_IMODE((tmp_path / "back.txt").stat().st_mode) == 0o640
    assert (tmp_path / "into" / "renamed.txt").read_bytes() == b"content"


async def test_copy_in_directory_follows_docker_cp_placement(
    server: str, root: Path, tmp_path: Path
) -> None:
    tree = tmp_path / "site"
    tree.mkdir()
    (tree / "index.html").write_bytes(b"hi")
    (root / "existing").mkdir()
    async with boxfiles.open_client(server) as client:
        await client.copy_in(tree, "/new")  # missing: becomes /new
        await client.copy_in(tree, "/existing")  # a directory: lands inside by name
        await client.copy_in(f"{tree}/.", "/existing")  # contents: merged in
    assert (root / "new" / "index.html").read_bytes() == b"hi"
    assert (root / "existing" / "site" / "index.html").read_bytes() == b"hi"
    assert (root / "existing" / "index.html").read_bytes() == b"hi"
    assert sorted(p.name for p in root.iterdir()) == ["existing", "new"]


async def test_empty_directory_and_empty_file(server: str, root: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "zero").write_bytes(b"")
    async with boxfiles.open_client(server) as client:
        await client.copy_in(tmp_path / "empty", "/e")
        await client.copy_in(tmp_path / "zero", "/z")
        await client.copy_out("/e", tmp_path / "e-back")
        await client.copy_out("/z", tmp_path / "z-back")
    assert list((root / "e").iterdir()) == []
    assert (root / "z").read_bytes() == b""
    assert list((tmp_path / "e-back").iterdir()) == []
    assert (tmp_path / "z-back").read_bytes() == b""


async def test_source_is_dir_always_sent(sock_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "d").mkdir()
    async with scripted_server(sock_dir) as srv, boxfiles.open_client(srv.target) as client:
        await client.copy_in(tmp_path / "f", "/f")
        await client.copy_in(tmp_path / "d", "/d")
        await client.copy_in(f"{tmp_path}/d/.", "/d")
    flags = [r.chunks[0].source_is_dir for r in srv.records]
    assert all(r.chunks[0].HasField("source_is_dir") for r in srv.records)
    assert flags == [False, True, True]
    with tarfile.open(fileobj=io.BytesIO(srv.records[0].data)) as tar:
        assert tar.getnames() == ["f"]
    with tarfile.open(fileobj=io.BytesIO(srv.records[1].data)) as tar:
        assert tar.getnames() == ["."]


async def test_follow_symlinks_follows_only_the_source(sock_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "inner").symlink_to("/etc/hostname")
    (tmp_path / "link").symlink_to("real")
    async with scripted_server(sock_dir) as srv, boxfiles.open_client(srv.target) as client:
        await client.copy_in(tmp_path / "link", "/a")
        await client.copy_in(tmp_path / "link", "/b", follow_symlinks=True)
    plain, followed = srv.records
    assert not plain.chunks[0].source_is_dir
    assert followed.chunks[0].source_is_dir
    with tarfile.open(fileobj=io.BytesIO(plain.data)) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.linkname) == ("link", "real")
    with tarfile.open(fileobj=io.BytesIO(followed.data)) as tar:
        inner = tar.getmember("./inner")
        assert inner.issym()
        assert inner.linkname == "/etc/hostname"


# ---------------------------------------------------------- copy_out placement


async def test_copy_out_follows_docker_cp_placement(
    server: str, root: Path, tmp_path: Path
) -> None:
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "sub" / "f").write_bytes(b"f")
    (root / "d" / "g").write_bytes(b"g")
    # Read-only directories must still be moved into place (a directory
    # changing parent needs write access to itself) and keep their mode.
    (root / "d" / "sub").chmod(0o555)
    (root / "d").chmod(0o555)
    async with boxfiles.open_client(server) as client:
        await client.copy_out("/d", tmp_path / "new")  # missing dest: becomes the dir
        (tmp_path / "existing").mkdir()
        (tmp_path / "existing" / "keep").write_bytes(b"k")
        await client.copy_out("/d", tmp_path / "existing")  # existing dir: lands inside
        (tmp_path / "merge").mkdir()
        (tmp_path / "merge" / "g").write_bytes(b"old")
        (tmp_path / "merge" / "keep").write_bytes(b"k")
        await client.copy_out("/d/.", tmp_path / "merge")  # contents merged
        await client.copy_out("/", tmp_path / "whole")  # the root has no name: contents
    assert sorted(os.listdir(tmp_path / "new")) == ["g", "sub"]
    assert sorted(os.listdir(tmp_path / "existing")) == ["d", "keep"]
    assert (tmp_path / "existing" / "d" / "sub" / "f").read_bytes() == b"f"
    assert sorted(os.listdir(tmp_path / "merge")) == ["g", "keep", "sub"]
    assert (tmp_path / "merge" / "g").read_bytes() == b"g"
    assert os.listdir(tmp_path / "whole") == ["d"]
    assert not list(tmp_path.rglob(".boxfiles-*"))
    for path in (tmp_path / "new", tmp_path / "existing" / "d", tmp_path / "merge" / "sub"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o555


async def test_copy_out_merge_replaces_a_local_symlink_without_following_it(
    server: str, root: Path, tmp_path: Path
) -> None:
    (root / "d").mkdir()
    (root / "d" / "victim").write_bytes(b"from the box")
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "victim").symlink_to(outside)
    async with boxfiles.open_client(server) as client:
        await client.copy_out("/d/.", tmp_path / "dest")
    assert outside.read_bytes() == b"precious"
    assert not (tmp_path / "dest" / "victim").is_symlink()
    assert (tmp_path / "dest" / "victim").read_bytes() == b"from the box"


@pytest.mark.parametrize(
    ("src", "dest", "match"),
    [
        pytest.param("/d", "missing-parent/x", "No such file", id="parent-missing"),
        pytest.param("/f", "nodir/", "No such directory", id="trailing-slash-missing"),
        pytest.param("/d", "afile", "cannot overwrite non-directory", id="dir-onto-file"),
        pytest.param("/f", "adir", "cannot overwrite directory", id="file-onto-dir"),
    ],
)
async def test_copy_out_local_errors_leave_nothing(
    server: str, root: Path, tmp_path: Path, src: str, dest: str, match: str
) -> None:
    (root / "d").mkdir()
    (root / "f").write_bytes(b"f")
    (tmp_path / "afile").write_bytes(b"a")
    (tmp_path / "adir" / "f").mkdir(parents=True)
    before = snapshot(tmp_path)
    async with boxfiles.open_client(server) as client:
        with pytest.raises(boxfiles.LocalIOError, match=match):
            await client.copy_out(src, f"{tmp_path}/{dest}")
    assert snapshot(tmp_path) == before


async def test_copy_out_missing_source_is_not_found(
    server: str, root: Path, tmp_path: Path
) -> None:
    async with boxfiles.open_client(server) as client:
        with pytest.raises(boxfiles.NotFound):
            await client.copy_out("/nope", tmp_path / "x")
    assert list(tmp_path.iterdir()) == [root]


# --------------------------------------------------------------- hostile servers


def with_pax(info: tarfile.TarInfo, **pax: str) -> tarfile.TarInfo:
    info.pax_headers = pax
    return info


HOSTILE = {
    "nan-mtime": archive((with_pax(entry("f"), mtime="nan"), b"x")),
    "overflowing-mtime": archive((with_pax(entry("f"), mtime="1e400"), b"x")),
    "far-off-dir-mtime": archive(
        (with_pax(entry("d", tarfile.DIRTYPE), mtime="99999999999999999999"), None)
    ),
    "dotdot": archive((entry("d", tarfile.DIRTYPE), None), (entry("d/../../evil"), b"x")),
    "absolute": archive(
        (entry("/tmp/evil"), b"x"),
    ),
    "hardlink-outside": archive(
        (entry("d", tarfile.DIRTYPE), None), (entry("d/h", tarfile.LNKTYPE, "/etc/passwd"), None)
    ),
    "hardlink-not-in-archive": archive(
        (entry("d", tarfile.DIRTYPE), None), (entry("d/h", tarfile.LNKTYPE, "d/later"), None)
    ),
    "hardlink-dotdot": archive(
        (entry("d", tarfile.DIRTYPE), None), (entry("d/h", tarfile.LNKTYPE, "../x"), None)
    ),
    "through-file": archive(
        (entry("d", tarfile.DIRTYPE), None), (entry("d/f"), b"f"), (entry("d/f/x"), b"x")
    ),
    "chardev": archive(
        (entry("d", tarfile.DIRTYPE), None), (entry("d/null", tarfile.CHRTYPE), None)
    ),
    "blockdev": archive(
        (entry("d", tarfile.DIRTYPE), None), (entry("d/sda", tarfile.BLKTYPE), None)
    ),
    "fifo": archive((entry("d", tarfile.DIRTYPE), None), (entry("d/pipe", tarfile.FIFOTYPE), None)),
    "two-top-level": archive((entry("d", tarfile.DIRTYPE), None), (entry("other"), b"x")),
    "garbage": os.urandom(4096),
    "huge-pax-header": archive(
        (entry("d", tarfile.DIRTYPE), None),
        (with_pax(entry("d/f"), comment="c" * (MAX_ENTRY_HEADER_BYTES + 1)), b"x"),
    ),
}


def through_symlink(target: Path) -> bytes:
    return archive(
        (entry("d", tarfile.DIRTYPE), None),
        (entry("d/link", tarfile.SYMTYPE, str(target)), None),
        (entry("d/link/pwned"), b"x"),
    )


@pytest.mark.parametrize("case", [*sorted(HOSTILE), "through-symlink"])
async def test_hostile_archive_is_refused_and_leaves_nothing(
    sock_dir: Path, tmp_path: Path, case: str
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    data = through_symlink(target) if case == "through-symlink" else HOSTILE[case]
    work = tmp_path / "work"
    work.mkdir()
    (work / "existing").mkdir()
    (work / "existing" / "keep").write_bytes(b"k")
    before = snapshot(tmp_path)
    async with scripted_server(sock_dir, download=serve_bytes(data)) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            with pytest.raises(boxfiles.UnsafeArchive):
                await client.copy_out("/d", work / "new")
            with pytest.raises(boxfiles.UnsafeArchive):
                await client.copy_out("/d", work / "existing")
    assert snapshot(tmp_path) == before
    assert list(target.iterdir()) == []
    assert not (tmp_path.parent / "evil").exists()
    assert not Path("/tmp/evil").exists()


async def test_symlink_entries_are_verbatim_and_never_followed(
    sock_dir: Path, tmp_path: Path
) -> None:
    data = archive(
        (entry("d", tarfile.DIRTYPE), None),
        (entry("d/abs", tarfile.SYMTYPE, "/etc/passwd"), None),
        (entry("d/up", tarfile.SYMTYPE, "../../../../etc"), None),
        # A later entry of the same name replaces the link; it does not
        # write through it.
        (entry("d/abs"), b"replaced"),
    )
    async with scripted_server(sock_dir, download=serve_bytes(data)) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            await client.copy_out("/d", tmp_path / "out")
    assert os.readlink(tmp_path / "out" / "up") == "../../../../etc"
    assert not (tmp_path / "out" / "abs").is_symlink()
    assert (tmp_path / "out" / "abs").read_bytes() == b"replaced"
    assert Path("/etc/passwd").read_bytes() != b"replaced"


async def test_truncated_archive_is_incomplete(sock_dir: Path, tmp_path: Path) -> None:
    data = archive((entry("d", tarfile.DIRTYPE), None), (entry("d/big"), os.urandom(200_000)))
    async with scripted_server(sock_dir, download=serve_bytes(data[:100_000])) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            with pytest.raises(boxfiles.IncompleteTransfer):
                await client.copy_out("/d", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


async def copy_out_of(
    sock_dir: Path,
    data: bytes,
    dests: list[Path],
    error: type[Exception] | None = None,
    match: str = "",
) -> None:
    """copy_out of "/ok" from a server that answers OK with ``data``, expecting ``error``."""
    async with scripted_server(sock_dir, download=serve_bytes(data)) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            for dest in dests:
                if error is None:
                    await client.copy_out("/ok", dest)
                    continue
                with pytest.raises(error, match=match):
                    await client.copy_out("/ok", dest)


async def test_archive_with_a_proper_end_is_copied(sock_dir: Path, tmp_path: Path) -> None:
    # The control for the shapes below: ended properly, padded with zeros.
    data = tarshapes.whole(tarshapes.member_bytes("ok", b"fine"))
    await copy_out_of(sock_dir, data + b"\0" * (10240 - len(data)), [tmp_path / "out"])
    assert (tmp_path / "out").read_bytes() == b"fine"


@pytest.mark.parametrize(("name", "shape"), sorted(tarshapes.corrupt_shapes().items()))
async def test_corrupt_archive_is_unsafe_and_leaves_nothing(
    sock_dir: Path, tmp_path: Path, name: str, shape: tuple[bytes, str]
) -> None:
    data, named = shape
    (tmp_path / "keep").write_bytes(b"k")
    before = snapshot(tmp_path)
    dests = [tmp_path / "out", tmp_path / "keep"]
    await copy_out_of(sock_dir, data, dests, boxfiles.UnsafeArchive, named)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("name", "data"), sorted(tarshapes.truncated_shapes().items()))
async def test_archive_without_end_marker_is_incomplete(
    sock_dir: Path, tmp_path: Path, name: str, data: bytes
) -> None:
    await copy_out_of(
        sock_dir, data, [tmp_path / "out"], boxfiles.IncompleteTransfer, "end-of-archive blocks"
    )
    assert list(tmp_path.iterdir()) == []


async def test_server_error_mid_stream_keeps_status_and_leaves_nothing(
    sock_dir: Path, tmp_path: Path
) -> None:
    data = archive((entry("d", tarfile.DIRTYPE), None), (entry("d/big"), os.urandom(3 * MiB)))
    script = serve_bytes(data[: 2 * MiB], then=boxfiles.PermissionDenied("no peeking"))
    async with scripted_server(sock_dir, download=script) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            with pytest.raises(boxfiles.PermissionDenied, match="no peeking"):
                await client.copy_out("/d", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


async def test_copy_out_cancel_resets_and_leaves_nothing(sock_dir: Path, tmp_path: Path) -> None:
    reset = trio.Event()
    head = archive((entry("d", tarfile.DIRTYPE), None), (entry("d/big"), b"z" * (64 * MiB)))

    async def endless(call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        await call.recv()
        try:
            for i in range(0, len(head), 65536):
                await call.send(DownloadChunk(data=head[i : i + 65536]))
            await trio.sleep_forever()
        except trio.Cancelled:
            reset.set()
            raise

    async with scripted_server(sock_dir, download=endless) as srv:
        leaks = Leaks()
        async with boxfiles.open_client(srv.target) as client:
            with trio.move_on_after(0.3) as scope:
                await client.copy_out("/d", tmp_path / "out")
            assert scope.cancelled_caught
            with trio.fail_after(PROMPT):
                await reset.wait()
            assert_no_asyncio_tasks()
        await leaks.check()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ copy_in failures


async def test_copy_in_missing_source_is_local_error(
    server: str, root: Path, tmp_path: Path
) -> None:
    async with boxfiles.open_client(server) as client:
        with pytest.raises(boxfiles.LocalIOError, match="nope"):
            await client.copy_in(tmp_path / "nope", "/x")
    assert list(root.iterdir()) == []


async def test_copy_in_fifo_fails_locally_and_resets_stream(sock_dir: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_bytes(os.urandom(3 * MiB))  # sorted before the fifo: sent first
    os.mkfifo(tree / "b-fifo")
    async with scripted_server(sock_dir) as srv, boxfiles.open_client(srv.target) as client:
        with pytest.raises(boxfiles.LocalIOError, match="b-fifo: it is a fifo"):
            await client.copy_in(tree, "/x")
        (record,) = srv.records
        with trio.fail_after(PROMPT):
            await record.done.wait()
    assert not record.ended_cleanly


async def test_copy_in_server_refusal_propagates(server: str, root: Path, tmp_path: Path) -> None:
    (root / "x").write_bytes(b"old")
    (tmp_path / "x").write_bytes(b"new")
    async with boxfiles.open_client(server) as client:
        with pytest.raises(boxfiles.AlreadyExists):
            await client.copy_in(tmp_path / "x", "/x", overwrite=False)
        with pytest.raises(boxfiles.NotFound):
            await client.copy_in(tmp_path / "x", "/no/parent/x", mkdir_parents=False)
    assert (root / "x").read_bytes() == b"old"


async def test_copy_in_early_refusal_stops_the_packer(sock_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(os.urandom(32 * MiB))

    async def refuse(call: ServerCall[UploadChunk, UploadResponse], record: Record) -> None:
        first = await call.recv()
        assert first is not None
        record.chunks.append(first)
        raise boxfiles.PermissionDenied("read-only box")

    async with scripted_server(sock_dir, upload=refuse) as srv:
        leaks = Leaks()
        async with boxfiles.open_client(srv.target) as client:
            with (
                trio.fail_after(PROMPT),
                pytest.raises(boxfiles.PermissionDenied, match="read-only"),
            ):
                await client.copy_in(tmp_path / "big", "/big")
        await leaks.check()
    assert len(srv.records[0].chunks) == 1


async def test_copy_in_cancel_resets_promptly(sock_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(os.urandom(16 * MiB))

    async def stall(call: ServerCall[UploadChunk, UploadResponse], record: Record) -> None:
        record.chunks.append(await call.recv())  # type: ignore[arg-type]
        await trio.sleep_forever()  # never reads on: the client's window fills up

    async with scripted_server(sock_dir, upload=stall) as srv:
        leaks = Leaks()
        async with boxfiles.open_client(srv.target) as client:
            with trio.move_on_after(0.5) as scope:
                await client.copy_in(tmp_path / "big", "/big")
            assert scope.cancelled_caught
            with trio.fail_after(PROMPT):
                await srv.records[0].reset.wait()
        await leaks.check()


# --------------------------------------------------------------------- progress


async def test_progress_reports_exact_totals_throttled(sock_dir: Path, tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    stored: list[bytes] = []
    calls_in: list[tuple[int, int | None, float]] = []
    calls_out: list[tuple[int, int | None, float]] = []

    async def keep(call: ServerCall[UploadChunk, UploadResponse], record: Record) -> None:
        await recv_all(call, record)
        stored.append(record.data)
        await call.send(UploadResponse(success=True))

    async def give_back(call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        await call.recv()
        for i in range(0, len(stored[0]), 64 * 1024):
            await call.send(DownloadChunk(data=stored[0][i : i + 64 * 1024]))
            await trio.sleep(0.02)  # about 0.7 s in all: long enough for the throttle to matter

    async with scripted_server(sock_dir, upload=keep, download=give_back) as srv:
        async with boxfiles.open_client(srv.target) as client:
            await client.copy_in(
                tree, "/t", progress=lambda d, t: calls_in.append((d, t, time.monotonic()))
            )
            await client.copy_out(
                "/t/.",
                tmp_path / "out",
                progress=lambda d, t: calls_out.append((d, t, time.monotonic())),
            )
    size = len(stored[0])
    assert calls_in[-1][:2] == (size, size)  # the pre-walk's total is exact
    assert {total for _, total, _ in calls_in} == {size}
    assert calls_out[-1][:2] == (size, None)
    assert len(calls_out) > 2
    for calls in (calls_in, calls_out):
        dones = [done for done, _, _ in calls]
        assert dones == sorted(dones)
        # Throttled: reports before the final one are INTERVAL apart.
        times = [at for _, _, at in calls[:-1]]
        assert all(b - a >= INTERVAL for a, b in itertools.pairwise(times))


async def test_upload_and_download_tar_have_progress(sock_dir: Path, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 5)
    (tmp_path / "a.tar").write_bytes(data)
    seen: list[tuple[int, int | None]] = []
    async with scripted_server(sock_dir, download=serve_bytes(data)) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            await client.upload_tar(
                tmp_path / "a.tar", "/x", progress=lambda d, t: seen.append((d, t))
            )
            seen_out: list[tuple[int, int | None]] = []
            await client.download_tar(
                "/x", tmp_path / "b.tar", progress=lambda d, t: seen_out.append((d, t))
            )
            with pytest.raises(TypeError, match="progress"):
                await client.copy_in(tmp_path / "a.tar", "/x", progress=42)  # type: ignore[arg-type]
    assert seen[-1] == (len(data), len(data))
    assert seen_out[-1] == (len(data), None)

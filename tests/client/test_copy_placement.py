"""copy_out's local placement and copy_in's destination probe: nothing is
followed through a link the archive did not create, later entries replace
earlier ones as tar does, no walk recurses or holds a descriptor per level,
a failed placement leaves dest exactly as it was, and a directory never
replaces a file."""

from __future__ import annotations

import io
import logging
import os
import stat
import sys
import tarfile
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import h2.events
import pytest
import trio

import boxfiles
from boxfiles._aio import PEEK_WINDOW, ServerCall
from boxfiles._chunks import ChunkSink
from boxfiles._client._place import MAX_PLACE_FDS
from boxfiles._fs import remove_tree
from boxfiles._proto.files_pb2 import DownloadChunk, DownloadRequest
from boxfiles._server import _service
from boxfiles._wire import DEFAULT_CHUNK_SIZE, DOWNLOAD, Chunk
from boxfiles.testing import open_fault_server

from ..helpers.archives import archive, entry
from ..helpers.grpcio_sink import upload as sink_upload
from ..helpers.h2peer import GRPC_HEADERS, Peer, framed, h2_server
from ..helpers.scripted import scripted_server
from ..helpers.servers import grpcio_server, serve_bytes
from ..helpers.trees import copy_listing, deep_chain

PROMPT = 10.0  # generous guard against a hang; never a speed claim
MTIME = 1_600_000_000_000_000_000

#: Deeper than any recursion could go.
DEEP = sys.getrecursionlimit() + 50


def full_listing(path: Path) -> dict[str, tuple[object, ...]]:
    """copy_listing() with the mtimes of path itself and of every directory."""
    st = path.lstat()
    return {".": (st.st_mode, st.st_mtime_ns), **copy_listing(path)}


# ------------------------------------------------------ links in the destination


async def test_a_symlink_named_like_the_source_is_replaced_not_followed(
    server: str, root: Path, tmp_path: Path
) -> None:
    (root / "data" / "sub").mkdir(parents=True)
    (root / "data" / "sub" / "f").write_bytes(b"from the box")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sub").mkdir(parents=True)
    (elsewhere / "sub" / "f").write_bytes(b"precious")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "data").symlink_to(elsewhere)
    before = full_listing(elsewhere)
    async with boxfiles.open_client(server) as client:
        await client.copy_out("/data", dest)
    assert full_listing(elsewhere) == before
    assert not (dest / "data").is_symlink()
    assert (dest / "data" / "sub" / "f").read_bytes() == b"from the box"


async def test_symlinks_inside_existing_directories_are_replaced_not_followed(
    server: str, root: Path, tmp_path: Path
) -> None:
    (root / "d" / "sub" / "inner").mkdir(parents=True)
    (root / "d" / "sub" / "inner" / "pwned").write_bytes(b"x")
    (root / "d" / "sub" / "file").write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "file").write_bytes(b"precious")
    dest = tmp_path / "dest"
    (dest / "sub").mkdir(parents=True)
    (dest / "sub" / "inner").symlink_to(elsewhere)  # a directory in the archive
    (dest / "sub" / "file").symlink_to(elsewhere / "file")  # a file in the archive
    before = full_listing(elsewhere)
    async with boxfiles.open_client(server) as client:
        await client.copy_out("/d/.", dest)
    assert full_listing(elsewhere) == before
    assert not (dest / "sub" / "inner").is_symlink()
    assert not (dest / "sub" / "file").is_symlink()
    assert (dest / "sub" / "inner" / "pwned").read_bytes() == b"x"


async def test_a_hostile_server_cannot_name_its_entry_after_a_guessed_symlink(
    sock_dir: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "etc").symlink_to(elsewhere)
    (dest / "keep").write_bytes(b"k")
    data = archive((entry("etc", tarfile.DIRTYPE), None), (entry("etc/pwned"), b"x"))
    before = full_listing(tmp_path)
    async with scripted_server(sock_dir, download=serve_bytes(data)) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            # Asked for /d, it names the entry "etc": refused, whatever is there.
            with pytest.raises(boxfiles.UnsafeArchive, match="top-level entry 'etc'"):
                await client.copy_out("/d", dest)
            assert full_listing(tmp_path) == before
            # Asked for /etc: the local link is replaced, never written through.
            await client.copy_out("/etc", dest)
    assert list(elsewhere.iterdir()) == []
    assert not (dest / "etc").is_symlink()
    assert (dest / "etc" / "pwned").read_bytes() == b"x"


async def test_dest_itself_a_symlink(server: str, root: Path, tmp_path: Path) -> None:
    """dest is the caller's own path: a symlink to a directory is that
    directory; any other symlink at dest is replaced, never written through."""
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"new")
    (root / "f").write_bytes(b"new")
    target_dir = tmp_path / "target-dir"
    target_dir.mkdir()
    target_file = tmp_path / "target-file"
    target_file.write_bytes(b"precious")
    (tmp_path / "to-dir").symlink_to(target_dir)
    (tmp_path / "to-file").symlink_to(target_file)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    async with boxfiles.open_client(server) as client:
        await client.copy_out("/d", tmp_path / "to-dir")
        await client.copy_out("/f", tmp_path / "to-file")
        await client.copy_out("/d", tmp_path / "dangling")
    assert (target_dir / "d" / "f").read_bytes() == b"new"
    assert target_file.read_bytes() == b"precious"
    assert (tmp_path / "to-file").read_bytes() == b"new"
    assert not (tmp_path / "to-file").is_symlink()
    assert not (tmp_path / "dangling").is_symlink()
    assert (tmp_path / "dangling" / "f").read_bytes() == b"new"
    assert not (tmp_path / "nowhere").exists()


async def test_a_failed_merge_leaves_dest_exactly_as_it_was(
    server: str, root: Path, tmp_path: Path
) -> None:
    # Entries merge in name order: "a" replaces a file and "sub" merges into
    # a directory before "zz", a file, meets a directory and fails.
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "a").write_bytes(b"new")
    (root / "d" / "sub" / "b").write_bytes(b"new")
    (root / "d" / "sub" / "c").write_bytes(b"new")
    (root / "d" / "zz").write_bytes(b"new")
    dest = tmp_path / "d"
    (dest / "sub").mkdir(parents=True)
    (dest / "zz").mkdir()
    (dest / "a").write_bytes(b"old")
    (dest / "sub" / "b").symlink_to("elsewhere")
    (dest / "sub").chmod(0o750)
    for path in (dest / "a", dest / "sub" / "b", dest / "sub", dest / "zz", dest):
        os.utime(path, ns=(MTIME, MTIME), follow_symlinks=False)
    before = full_listing(tmp_path)
    async with boxfiles.open_client(server) as client:
        with pytest.raises(boxfiles.LocalIOError, match=f"cannot overwrite directory {dest}/zz"):
            await client.copy_out("/d/.", dest)
        with pytest.raises(boxfiles.LocalIOError, match=f"cannot overwrite directory {dest}/zz"):
            await client.copy_out("/d", tmp_path)  # lands by name: merges into dest too
    assert full_listing(tmp_path) == before


# ------------------------------------------------- later entries replace earlier


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        pytest.param(
            [
                ("d/x", tarfile.SYMTYPE, "/etc"),
                ("d/x", tarfile.DIRTYPE),
                ("d/x/ok", tarfile.REGTYPE),
            ],
            {"x": "dir", "x/ok": "file"},
            id="symlink-then-dir",
        ),
        pytest.param(
            [("d/x", tarfile.REGTYPE), ("d/x", tarfile.DIRTYPE), ("d/x/ok", tarfile.REGTYPE)],
            {"x": "dir", "x/ok": "file"},
            id="file-then-dir",
        ),
        pytest.param(
            [("d/x", tarfile.DIRTYPE), ("d/x/in", tarfile.REGTYPE), ("d/x", tarfile.SYMTYPE, "in")],
            {"x": "link"},
            id="dir-then-symlink",
        ),
        pytest.param(
            [("d/x", tarfile.DIRTYPE), ("d/x/y", tarfile.DIRTYPE), ("d/x", tarfile.REGTYPE)],
            {"x": "file"},
            id="dir-then-file",
        ),
        pytest.param(
            # The file the hard link named went with the directory it was in.
            [
                ("d/x", tarfile.DIRTYPE),
                ("d/x/f", tarfile.REGTYPE),
                ("d/x", tarfile.DIRTYPE),
                ("d/h", tarfile.LNKTYPE, "d/x/f"),
            ],
            {"x": "dir", "x/f": "file", "h": "file"},
            id="dir-then-dir-merges",
        ),
    ],
)
async def test_later_entries_replace_earlier_ones(
    sock_dir: Path, tmp_path: Path, members: list[tuple[str, bytes, str]], expected: dict[str, str]
) -> None:
    data = archive(
        (entry("d", tarfile.DIRTYPE), None),
        *[
            (
                entry(m[0], m[1], m[2] if len(m) > 2 else ""),
                b"x" if m[1] == tarfile.REGTYPE else None,
            )
            for m in members
        ],
    )
    async with scripted_server(sock_dir, download=serve_bytes(data)) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            await client.copy_out("/d", tmp_path / "out")
    kinds = {rel: found[0] for rel, found in copy_listing(tmp_path / "out").items()}
    assert kinds == expected
    assert not list(tmp_path.rglob(".boxfiles-*"))


async def test_a_dropped_directory_takes_its_hard_link_targets_with_it(
    sock_dir: Path, tmp_path: Path
) -> None:
    data = archive(
        (entry("d", tarfile.DIRTYPE), None),
        (entry("d/x", tarfile.DIRTYPE), None),
        (entry("d/x/f"), b"x"),
        (entry("d/x", tarfile.SYMTYPE, "/etc"), None),
        (entry("d/h", tarfile.LNKTYPE, "d/x/f"), None),
    )
    async with scripted_server(sock_dir, download=serve_bytes(data)) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            with pytest.raises(boxfiles.UnsafeArchive, match="hard link"):
                await client.copy_out("/d", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- deep trees


def deep_leaf(top: Path, depth: int) -> bytes:
    return Path(top, *["d"] * depth, "f").read_bytes()


@pytest.fixture
def deep_cleanup(tmp_path: Path) -> Iterator[Path]:
    # pytest removes tmp_path with shutil.rmtree, which recurses on 3.11.
    yield tmp_path
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in os.listdir(fd):
            remove_tree(fd, name)
    finally:
        os.close(fd)


def deep_tar(depth: int, *, leaf: bytes = b"leaf", truncate: bool = False) -> bytes:
    names = ["/".join(["top", *["d"] * level]) for level in range(depth + 1)]
    data = archive(
        *[(entry(name, tarfile.DIRTYPE), None) for name in names],
        (entry(f"{names[-1]}/f"), leaf),
    )
    return data[: data.index(leaf) + len(leaf) // 2] if truncate else data


async def test_copy_out_of_a_deep_tree(sock_dir: Path, deep_cleanup: Path) -> None:
    tmp_path = deep_cleanup
    deep_chain(tmp_path / "merge" / "top", DEEP, b"old", name="f")
    async with scripted_server(sock_dir, download=serve_bytes(deep_tar(DEEP))) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            with trio.fail_after(PROMPT):
                await client.copy_out("/top", tmp_path / "new")  # moved into place whole
                await client.copy_out("/top", tmp_path / "merge")  # merged level by level
    assert deep_leaf(tmp_path / "new", DEEP) == b"leaf"
    assert deep_leaf(tmp_path / "merge" / "top", DEEP) == b"leaf"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".boxfiles")] == []


async def test_a_failed_deep_copy_out_leaves_nothing(sock_dir: Path, deep_cleanup: Path) -> None:
    tmp_path = deep_cleanup
    (tmp_path / "out").mkdir()
    data = deep_tar(DEEP, leaf=os.urandom(4096), truncate=True)
    async with scripted_server(sock_dir, download=serve_bytes(data)) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            with trio.fail_after(PROMPT), pytest.raises(boxfiles.IncompleteTransfer):
                await client.copy_out("/top", tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []


async def test_copy_in_of_a_deep_tree(sock_dir: Path, deep_cleanup: Path) -> None:
    tmp_path = deep_cleanup
    deep_chain(tmp_path / "top", DEEP, name="f")
    async with scripted_server(sock_dir) as srv, boxfiles.open_client(srv.target) as client:
        with trio.fail_after(PROMPT):
            await client.copy_in(tmp_path / "top", "/top")
    with tarfile.open(fileobj=io.BytesIO(srv.records[-1].data)) as tar:
        names = tar.getnames()
    assert names[-1] == "/".join([".", *["d"] * DEEP, "f"])
    assert len(names) == DEEP + 2


_FD_BOUND_CHILD = """
import os, resource, sys, trio, boxfiles
from pathlib import Path
from boxfiles._client._place import MAX_PLACE_FDS
target, work, depth = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])

async def main():
    async with boxfiles.open_client(target) as client:
        await client.copy_out("/top", work / "warm-up")
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        # Each new descriptor takes the lowest free number: this leaves room
        # for MAX_PLACE_FDS more, and no more, than are open now.
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + MAX_PLACE_FDS, 4096))
        await client.copy_out("/top", work / "new")
        await client.copy_out("/top", work / "merge")
        try:
            await client.copy_out("/top", work / "fail")
        except boxfiles.IncompleteTransfer:
            print("failed as planned")
    print("ok")

trio.run(main)
"""


async def test_placement_holds_a_bounded_number_of_descriptors(
    sock_dir: Path, deep_cleanup: Path
) -> None:
    tmp_path = deep_cleanup
    depth = 8 * MAX_PLACE_FDS
    deep_chain(tmp_path / "merge" / "top", depth, b"old", name="f")
    (tmp_path / "fail").mkdir()
    whole, truncated = deep_tar(depth), deep_tar(depth, leaf=os.urandom(4096), truncate=True)
    sent = 0

    async def serve(call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        nonlocal sent
        sent += 1
        # The warm-up, new and merge copies get the whole tree; the last one
        # fails part way, after its staging holds the deep tree.
        await cast(Awaitable[None], serve_bytes(truncated if sent == 4 else whole)(call))

    async with scripted_server(sock_dir, download=serve) as srv:
        child = [sys.executable, "-c", textwrap.dedent(_FD_BOUND_CHILD)]
        result = await trio.run_process(
            [*child, srv.target, str(tmp_path), str(depth)], capture_stdout=True, check=False
        )
    assert result.returncode == 0, result
    assert result.stdout.decode().split() == ["failed", "as", "planned", "ok"]
    assert deep_leaf(tmp_path / "new", depth) == b"leaf"
    assert deep_leaf(tmp_path / "merge" / "top", depth) == b"leaf"
    assert os.listdir(tmp_path / "fail") == []


# ------------------------------------------------ copy_in: a tree onto a file


@pytest.mark.parametrize("src", ["site", "site/."])
@pytest.mark.parametrize("overwrite", [True, False])
async def test_copy_in_never_replaces_a_file_with_a_directory(
    server: str, root: Path, tmp_path: Path, src: str, overwrite: bool
) -> None:
    (tmp_path / "site" / "css").mkdir(parents=True)
    (tmp_path / "site" / "index.html").write_bytes(b"<html>")
    (root / "data").mkdir()
    (root / "data" / "report.txt").write_bytes(b"report")
    (root / "data" / "link").symlink_to("report.txt")  # resolved as the server would
    before = full_listing(root)
    async with boxfiles.open_client(server) as client:
        for dest in ("/data/report.txt", "/data/link"):
            with pytest.raises(boxfiles.FailedPrecondition, match=f"non-directory {dest} with"):
                await client.copy_in(f"{tmp_path}/{src}", dest, overwrite=overwrite)
        assert full_listing(root) == before
        # A file still replaces a file.
        await client.copy_in(tmp_path / "site" / "index.html", "/data/report.txt")
    assert (root / "data" / "report.txt").read_bytes() == b"<html>"


# ------------------------------------------------------------------ modes


async def test_copy_out_keeps_sticky_and_drops_set_id_bits_as_the_server(
    sock_dir: Path, tmp_path: Path
) -> None:
    shared, tool = entry("d/shared", tarfile.DIRTYPE), entry("d/tool")
    shared.mode, tool.mode = 0o1777, 0o6755
    data = archive((entry("d", tarfile.DIRTYPE), None), (shared, None), (tool, b"x"))
    async with scripted_server(sock_dir, download=serve_bytes(data)) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            await client.copy_out("/d", tmp_path / "out")
    assert stat.S_IMODE((tmp_path / "out" / "shared").stat().st_mode) == 0o1777
    assert stat.S_IMODE((tmp_path / "out" / "tool").stat().st_mode) == 0o755


# ------------------------------------------------------- the probe's cost


@pytest.fixture
def packed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the pieces the reference server's packers hand on to be
    sent (what left the packer), in order."""
    pieces: list[int] = []
    real_sink = ChunkSink

    def sink(hand_on: Callable[[Chunk], Awaitable[None]], *args: Any) -> ChunkSink:
        async def counted(chunk: Chunk) -> None:
            pieces.append(chunk.size)
            await hand_on(chunk)

        return real_sink(counted, *args)

    monkeypatch.setattr(_service, "ChunkSink", sink)
    return pieces


@pytest.fixture(scope="session")
def wide_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root whose /big is a directory of 2000 empty files: about 3 MiB of
    archive, all headers (the packer walks, it hardly reads). Made once:
    creating it is most of what the tests using it cost."""
    root = tmp_path_factory.mktemp("wide")
    (root / "big").mkdir()
    for i in range(2000):
        (root / "big" / f"entry-{i:04}").touch()
    return root


@pytest.fixture(params=["big_file", "big_dir", "wide_dir"])
def probed_root(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A root whose /big is a 16 MiB file, a directory holding one, or a
    wide directory."""
    if request.param == "wide_dir":
        return cast(Path, request.getfixturevalue("wide_root"))
    root = tmp_path / "root"
    root.mkdir()
    if request.param == "big_file":
        big_file(root)
    else:
        big_dir(root)
    return root


def big_file(root: Path) -> None:
    (root / "big").write_bytes(os.urandom(16 * DEFAULT_CHUNK_SIZE))


def big_dir(root: Path) -> None:
    (root / "big").mkdir()
    (root / "big" / "f").write_bytes(os.urandom(16 * DEFAULT_CHUNK_SIZE))


async def test_copy_in_probe_costs_at_most_one_chunk(
    sock_dir: Path, tmp_path: Path, packed: list[int], probed_root: Path
) -> None:
    (tmp_path / "site").mkdir()
    async with open_fault_server(probed_root, f"unix:{sock_dir}/f.sock") as server:
        async with boxfiles.open_client(server.target) as client:
            try:
                await client.copy_in(tmp_path / "site", "/big")
            except boxfiles.FailedPrecondition:
                assert (probed_root / "big").is_file()  # a directory never replaces a file
        (probe,) = [c for c in server.calls if c.method == "download"]
        # Ended, so its packing thread has returned (no thread outlives a call).
        with trio.fail_after(PROMPT):
            await probe.finished.wait()
    assert probe.reset
    assert probe.sizes == [0]  # source_is_dir alone; no data chunk sent whole
    assert sum(packed) <= DEFAULT_CHUNK_SIZE


async def test_packing_waits_for_the_first_chunk_to_be_taken(
    sock_dir: Path, packed: list[int], probed_root: Path
) -> None:
    # A probing client slow to reset: the packer must not run ahead meanwhile.
    async with open_fault_server(probed_root, f"unix:{sock_dir}/f.sock") as server:
        async with boxfiles.open_client(server.target) as client:
            with trio.CancelScope() as scope:
                async with client._calls.channel.open_call(DOWNLOAD, peek=True) as call:
                    await call.send(DownloadRequest(src_path="/big"), end=True)
                    first = await call.recv()
                    assert first is not None
                    assert first.HasField("source_is_dir")
                    await trio.sleep(0.3)
                    scope.cancel()  # leaving by cancellation resets the stream
        (probe,) = server.calls
        with trio.fail_after(PROMPT):
            await probe.finished.wait()
    assert probe.reset
    assert sum(packed) <= DEFAULT_CHUNK_SIZE


async def test_a_download_still_streams_whole(
    sock_dir: Path, tmp_path: Path, packed: list[int]
) -> None:
    # The packer waits for the first chunk to be taken, then runs on.
    root = tmp_path / "root"
    root.mkdir()
    big_dir(root)
    async with open_fault_server(root, f"unix:{sock_dir}/f.sock") as server:
        async with boxfiles.open_client(server.target) as client:
            await client.copy_out("/big", tmp_path / "out")
        (call,) = server.calls
    assert (tmp_path / "out" / "f").read_bytes() == (root / "big" / "f").read_bytes()
    assert call.sizes[0] == 0
    assert sum(call.sizes) == sum(packed) > 16 * DEFAULT_CHUNK_SIZE


def guest_like(request: DownloadRequest, context: Any) -> Iterator[DownloadChunk]:
    """A grpcio Download that sends as the real guest does: source_is_dir
    with the first chunk's data, then 15 more chunks."""
    data = bytes(DEFAULT_CHUNK_SIZE)
    yield DownloadChunk(data=data, source_is_dir=True)
    for _ in range(15):
        yield DownloadChunk(data=data)


@asynccontextmanager
async def counting_proxy(listen: Path, target: Path) -> AsyncIterator[list[int]]:
    """A unix-socket relay to ``target``; yields the count (one item) of
    bytes the server got onto the wire. The relay reads only as the
    client's side takes its bytes, so HTTP/2 flow control still holds."""
    counted = [0]
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(str(listen))
    listener.listen(1)

    async def pump(src: trio.SocketStream, dst: trio.SocketStream, count: bool) -> None:
        while data := await src.receive_some(1 << 16):
            if count:
                counted[0] += len(data)
            await dst.send_all(data)

    async def relay() -> None:
        conn, _ = await listener.accept()
        client = trio.SocketStream(conn)
        server = await trio.open_unix_socket(str(target))
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, server, False)
            nursery.start_soon(pump, server, client, True)

    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay)
            yield counted
            nursery.cancel_scope.cancel()


async def test_probe_of_a_guest_like_grpcio_server_costs_its_first_chunk(
    sock_dir: Path,
) -> None:
    with grpcio_server(sock_dir / "g.sock", sink_upload, guest_like):
        async with counting_proxy(sock_dir / "p.sock", sock_dir / "g.sock") as counted:
            async with boxfiles.open_client(f"unix:{sock_dir}/p.sock") as client:
                with trio.fail_after(PROMPT):
                    assert await client._calls.remote_kind("/big", container_id=None) == "dir"
                await trio.sleep(0.2)  # room for grpcio to send on, if it could
    # The first message, at most two windows more (the frame that ends the
    # message, then what its acknowledgement allows), and frame overhead.
    assert DEFAULT_CHUNK_SIZE < counted[0] <= DEFAULT_CHUNK_SIZE + 2 * PEEK_WINDOW + 4096


async def test_probe_window_bounds_what_a_guest_like_peer_gets_onto_the_wire(
    sock_dir: Path,
) -> None:
    # The same peer frame by frame: every byte it may send past the first
    # message is one the client's window allowed.
    first = framed(
        DownloadChunk(data=bytes(DEFAULT_CHUNK_SIZE), source_is_dir=True).SerializeToString()
    )
    rest = framed(DownloadChunk(data=bytes(DEFAULT_CHUNK_SIZE)).SerializeToString()) * 15
    sent = 0
    reset = trio.Event()

    async def serve(peers: trio.MemoryReceiveChannel[Peer]) -> None:
        nonlocal sent
        peer = await peers.receive()
        sid = (await peer.until(h2.events.RequestReceived)).stream_id
        await peer.until(h2.events.StreamEnded)
        peer.h2.send_headers(sid, GRPC_HEADERS)
        view = memoryview(first + rest)
        while view:
            size = min(peer.h2.local_flow_control_window(sid), peer.h2.max_outbound_frame_size)
            if size > 0:
                peer.h2.send_data(sid, view[:size].tobytes())
                await peer.flush()
                sent += size
                view = view[size:]
                continue
            data = await peer.conn.recv(1 << 20)
            events = peer.h2.receive_data(data)
            await peer.flush()
            if any(isinstance(e, h2.events.StreamReset) for e in events):
                reset.set()
                return
            if not data:
                return

    async with h2_server(sock_dir / "h2.sock") as (target, peers), trio.open_nursery() as nursery:
        nursery.start_soon(serve, peers)
        async with boxfiles.open_client(target) as client:
            with trio.fail_after(PROMPT):
                assert await client._calls.remote_kind("/big", container_id=None) == "dir"
            with trio.fail_after(PROMPT):
                await reset.wait()
        nursery.cancel_scope.cancel()
    assert len(first) <= sent <= len(first) + 2 * PEEK_WINDOW


async def test_routine_probes_are_not_warnings(
    server: str, root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    big_dir(root)
    (root / "file").write_bytes(os.urandom(4 * DEFAULT_CHUNK_SIZE))
    (tmp_path / "site").mkdir()
    with caplog.at_level(logging.INFO, logger="boxfiles.server"):
        async with boxfiles.open_client(server) as client:
            await client.copy_in(tmp_path / "site", "/big")
            await client.copy_in(tmp_path / "site", "/missing")
            with pytest.raises(boxfiles.FailedPrecondition):
                await client.copy_in(tmp_path / "site", "/file")
        await trio.sleep(0.2)  # the server's last log lines
    downloads = [r for r in caplog.records if r.getMessage().startswith("download ")]
    assert len(downloads) == 3
    assert all(r.levelno == logging.INFO for r in downloads)

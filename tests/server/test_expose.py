"""serve_files' surface: containers, listening sockets, options, logging."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
from pathlib import Path

import pytest
import trio

import boxfiles
from boxfiles._server._confine import STAGING_PREFIX

from ..helpers.archives import contents, files
from ..helpers.servers import download, serving, upload


@pytest.fixture
def two_roots(tmp_path: Path) -> dict[str, Path]:
    roots = {"alpha": tmp_path / "a", "beta": tmp_path / "b"}
    for path in roots.values():
        path.mkdir()
    return roots


async def test_container_ids_pick_their_roots(two_roots: dict[str, Path], sock_dir: Path) -> None:
    async with serving(two_roots, sock_dir) as target:
        await upload(target, files(f=b"a"), "/f", container_id="alpha")
        await upload(target, files(f=b"b"), "/f", container_id="beta")
        data, _ = await download(target, "/f", container_id="beta")
    assert (two_roots["alpha"] / "f").read_bytes() == b"a"
    assert (two_roots["beta"] / "f").read_bytes() == b"b"
    assert contents(data) == {"f": b"b"}


async def test_empty_id_with_several_containers(two_roots: dict[str, Path], sock_dir: Path) -> None:
    async with serving(two_roots, sock_dir) as target:
        with pytest.raises(boxfiles.FailedPrecondition, match="container_id is required"):
            await upload(target, files(f=b"a"), "/f")
        with pytest.raises(boxfiles.FailedPrecondition, match="container_id is required"):
            await download(target, "/")
    assert all(os.listdir(p) == [] for p in two_roots.values())


async def test_empty_id_picks_the_sole_container(tmp_path: Path, sock_dir: Path) -> None:
    (tmp_path / "only").mkdir()
    async with serving({"only": tmp_path / "only"}, sock_dir) as target:
        await upload(target, files(f=b"x"), "/f")
        with pytest.raises(boxfiles.FailedPrecondition, match="container not found: other"):
            await upload(target, files(f=b"x"), "/f", container_id="other")
    assert (tmp_path / "only" / "f").read_bytes() == b"x"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_upload_bytes": -1}, "max_upload_bytes"),
        ({"max_upload_bytes": 1.5}, "max_upload_bytes"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
async def test_bad_options(
    root: Path, sock_dir: Path, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        async with serving(root, sock_dir, **kwargs):
            pass


async def test_bad_roots(tmp_path: Path, sock_dir: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        async with serving(tmp_path / "missing", sock_dir):
            pass
    with pytest.raises(ValueError, match="no container roots"):
        async with serving({}, sock_dir):
            pass


async def test_unix_socket_is_owner_only_and_removed(root: Path, sock_dir: Path) -> None:
    path = sock_dir / "s.sock"
    async with serving(root, sock_dir):
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
    assert not path.exists()


async def test_stale_socket_is_replaced(root: Path, sock_dir: Path) -> None:
    path = sock_dir / "s.sock"
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(path))
    crashed.close()  # the file stays behind, nobody listens
    async with serving(root, sock_dir) as target:
        await upload(target, files(f=b"x"), "/f")
    assert not path.exists()


async def test_live_socket_is_not_taken_over(root: Path, sock_dir: Path) -> None:
    async with serving(root, sock_dir) as target:
        with pytest.raises(OSError, match="another server is listening") as info:
            async with serving(root, sock_dir):
                pass
        assert info.value.errno == errno.EADDRINUSE
        await upload(target, files(f=b"x"), "/f")  # the first one is unharmed


async def test_a_file_in_the_way_is_not_removed(root: Path, sock_dir: Path) -> None:
    (sock_dir / "s.sock").write_text("not a socket")
    with pytest.raises(FileExistsError):
        async with serving(root, sock_dir):
            pass
    assert (sock_dir / "s.sock").read_text() == "not a socket"


async def test_tcp_binds_loopback(root: Path) -> None:
    async with trio.open_nursery() as nursery:
        target = await nursery.start(boxfiles.serve_files, root, "127.0.0.1:0")
        assert target.startswith("tcp://127.0.0.1:")
        assert not target.endswith(":0")
        await upload(target, files(f=b"x"), "/f")
        nursery.cancel_scope.cancel()
    assert (root / "f").read_bytes() == b"x"


async def test_tcp_remote_needs_allow_remote(root: Path) -> None:
    with pytest.raises(ValueError, match="allow_remote=True"):
        await boxfiles.serve_files(root, "0.0.0.0:0")
    async with trio.open_nursery() as nursery:
        target = await nursery.start(
            lambda task_status: boxfiles.serve_files(
                root, "0.0.0.0:0", allow_remote=True, task_status=task_status
            )
        )
        assert target.startswith("tcp://0.0.0.0:")
        nursery.cancel_scope.cancel()


async def test_one_log_line_per_transfer(
    server: str, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="boxfiles.server")
    data = files(f=b"x" * 1000)
    await upload(server, data, "/f")
    await download(server, "/f")
    with pytest.raises(boxfiles.NotFound):
        await download(server, "/missing")
    records = [r for r in caplog.records if r.name == "boxfiles.server"]
    assert [(r.levelno, r.getMessage().split()[0]) for r in records] == [
        (logging.INFO, "upload"),
        (logging.INFO, "download"),
        (logging.INFO, "download"),  # a routine probe, not a warning
    ]
    up, down, missing = (r.getMessage() for r in records)
    assert f"container='' path='/f' bytes={len(data)} duration=" in up
    assert up.endswith("outcome=ok")
    assert "path='/f'" in down
    assert "outcome=NOT_FOUND: source path does not exist: /missing" in missing
    assert os.listdir(root) == ["f"]


async def test_stale_staging_is_swept_at_start(
    root: Path, sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Staging is made beside or in the destination, so debris can be at any
    # depth; a dead server's is removed whatever its age, a live one's kept.
    (root / "a" / "b").mkdir(parents=True)
    crashed, nested, live = (
        root / f"{STAGING_PREFIX}crashed",
        root / "a" / "b" / f"{STAGING_PREFIX}nested",
        root / "a" / f"{STAGING_PREFIX}live",
    )
    for path in (crashed, nested, live):
        (path / "tree" / "sub").mkdir(parents=True)
        (path / "tree" / "sub" / "f").write_text("partial")
    holder = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # as a running upload holds it
        async with serving(root, sock_dir):
            pass
    finally:
        os.close(holder)
    assert sorted(p.name for p in root.iterdir()) == ["a"]
    assert sorted(p.name for p in (root / "a").iterdir()) == [live.name, "b"]
    assert list((root / "a" / "b").iterdir()) == []
    assert f"removed stale staging {crashed.name}" in caplog.text
    assert f"removed stale staging a/b/{nested.name}" in caplog.text


async def test_sweep_leaves_what_is_not_a_staging_directory(root: Path, sock_dir: Path) -> None:
    # Neither stops the server from starting, nor is removed.
    (root / f"{STAGING_PREFIX}file").write_text("not ours")
    (root / f"{STAGING_PREFIX}link").symlink_to("/")
    async with serving(root, sock_dir):
        pass
    assert sorted(p.name for p in root.iterdir()) == [
        f"{STAGING_PREFIX}file",
        f"{STAGING_PREFIX}link",
    ]

"""What a copy does not carry, as the README states it: ownership (files
arrive owned by whoever writes them), set-id and sticky bits, and special files
(sockets skipped; fifos and devices refused going in, skipped coming out)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

import boxfiles

OTHER = 4321  # a uid/gid nobody here runs as


def unix_socket_file(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")


@pytest.mark.usefixtures("as_root")
async def test_ownership_is_the_writers(server: str, root: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"f")
    os.chown(tree / "f", OTHER, OTHER)
    (root / "g").write_bytes(b"g")
    os.chown(root / "g", OTHER, OTHER)
    async with boxfiles.open_client(server) as client:
        await client.copy_in(tree, "/in")
        await client.copy_out("/g", tmp_path / "g")
    assert (root / "in" / "f").stat().st_uid == os.getuid()  # the server's user
    assert (root / "in" / "f").stat().st_gid == os.getgid()
    assert (tmp_path / "g").stat().st_uid == os.getuid()  # the client's user
    assert (tmp_path / "g").stat().st_gid == os.getgid()


async def test_setid_bits_are_dropped_and_sticky_kept_coming_out(
    server: str, root: Path, tmp_path: Path
) -> None:
    (root / "suid").write_bytes(b"x")
    os.chmod(root / "suid", 0o7755)
    async with boxfiles.open_client(server) as client:
        await client.copy_out("/suid", tmp_path / "suid")
    assert stat.S_IMODE((tmp_path / "suid").stat().st_mode) == 0o1755


async def test_sockets_are_skipped_going_in(server: str, root: Path, sock_dir: Path) -> None:
    tree = sock_dir / "tree"  # short: a socket's path is limited to 107 bytes
    tree.mkdir()
    (tree / "f").write_bytes(b"f")
    unix_socket_file(tree / "s")
    async with boxfiles.open_client(server) as client:
        await client.copy_in(tree, "/in")
    assert sorted(os.listdir(root / "in")) == ["f"]


async def test_fifos_are_refused_going_in(server: str, root: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    os.mkfifo(tree / "p")
    async with boxfiles.open_client(server) as client:
        with pytest.raises(boxfiles.LocalIOError, match=f"cannot copy {tree / 'p'}: it is a fifo"):
            await client.copy_in(tree, "/in")
    assert list(root.iterdir()) == []


async def test_special_files_are_skipped_coming_out(
    server: str, root: Path, sock_dir: Path, tmp_path: Path
) -> None:
    # The root is under tmp_path, too long a path for a socket: link it in.
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"f")
    os.mkfifo(root / "d" / "p")
    unix_socket_file(sock_dir / "s")
    os.link(sock_dir / "s", root / "d" / "s")
    if os.geteuid() == 0:
        os.mknod(root / "d" / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    async with boxfiles.open_client(server) as client:
        await client.copy_out("/d", tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["f"]

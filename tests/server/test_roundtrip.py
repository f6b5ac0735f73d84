"""What a tree carries survives upload then download through the reference server."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import boxfiles

from ..helpers.archives import BytesReader, archive, member
from ..helpers.servers import download, upload
from ..helpers.trees import listing

MiB = 1024 * 1024
LONG = "l" * 60 + "/" + "o" * 70 + "/" + "n" * 80 + ".txt"  # > 100 bytes: PAX


def make_tree(top: Path) -> Path:
    top.mkdir()
    (top / "empty.txt").write_bytes(b"")
    (top / "large.bin").write_bytes(os.urandom(5 * MiB + 123))
    (top / "nested" / "deeper" / "deepest").mkdir(parents=True)
    (top / "nested" / "deeper" / "deepest" / "leaf").write_text("leaf")
    (top / "empty-dir").mkdir()
    (top / "rel-link").symlink_to("nested/deeper")
    (top / "abs-link").symlink_to("/etc/passwd")
    (top / "dangling").symlink_to("does/not/exist")
    (top / "hard-a").write_text("shared")
    os.link(top / "hard-a", top / "hard-b")
    (top / "exec.sh").write_text("#!/bin/sh\n")
    (top / "exec.sh").chmod(0o755)
    (top / "private").write_text("p")
    (top / "private").chmod(0o600)
    (top / "sticky-dir").mkdir()
    (top / "sticky-dir").chmod(0o1777)
    (top / "ünïcödé ✓ name").write_text("u")
    (top / "with space").mkdir()
    (top / "with space" / "a b c").write_text("s")
    (top / LONG).parent.mkdir(parents=True)
    (top / LONG).write_text("long")
    (top / "readonly-dir").mkdir()
    (top / "readonly-dir" / "f").write_text("r")
    for i, path in enumerate(sorted(top.rglob("*"), reverse=True)):
        os.utime(path, (1_500_000_000 + i, 1_500_000_000 + i), follow_symlinks=False)
    (top / "readonly-dir").chmod(0o555)
    os.utime(top / "readonly-dir", (1_400_000_000, 1_400_000_000))
    os.utime(top, (1_300_000_000, 1_300_000_000))
    return top


def tar_dir(top: Path) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(top, arcname=".")
    return out.getvalue()


def metadata(top: Path) -> dict[str, tuple[int, int, int]]:
    """Whole-second mtime, inode group and mode of every entry below ``top``."""
    inodes: dict[int, int] = {}
    found = {}
    for path in sorted(top.rglob("*")):
        st = path.lstat()
        group = inodes.setdefault(st.st_ino, len(inodes))
        found[str(path.relative_to(top))] = (int(st.st_mtime), group, stat.S_IMODE(st.st_mode))
    return found


async def test_round_trip_preserves_the_tree(server: str, root: Path, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    try:
        async with boxfiles.open_client(server) as client:
            await client.upload_tar(BytesReader(tar_dir(src)), "/box/copy")
        assert listing(root / "box" / "copy") == listing(src)
        assert metadata(root / "box" / "copy") == metadata(src)
        assert (root / "box" / "copy").stat().st_mtime == 1_300_000_000
        assert os.readlink(root / "box" / "copy" / "abs-link") == "/etc/passwd"  # verbatim

        data, is_dir = await download(server, "/box/copy", include_parent=False)
        assert is_dir is True
        assert data is not None
        async with boxfiles.open_client(server) as client:
            await client.upload_tar(BytesReader(data), "/again")
        assert listing(root / "again") == listing(src)
        assert metadata(root / "again") == metadata(src)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            kinds = {m.name: m.type for m in tar.getmembers()}
        assert kinds["./hard-b"] == tarfile.LNKTYPE  # the link, not a second copy
    finally:
        for top in (src, root / "box" / "copy", root / "again"):
            if (top / "readonly-dir").exists():
                (top / "readonly-dir").chmod(0o755)  # so tmp_path can be removed


async def test_setuid_bits_are_dropped(server: str, root: Path) -> None:
    await upload(server, archive(member("suid", b"x", mode=0o6755)), "/suid")
    assert stat.S_IMODE((root / "suid").stat().st_mode) == 0o755

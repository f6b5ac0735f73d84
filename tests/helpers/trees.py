"""Trees on disk: made, listed whole (to prove a failure changed nothing), and watched for staging."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import trio

from boxfiles._server._confine import STAGING_PREFIX

Entry = tuple[str, str | int | None, str | None]


def listing(top: Path) -> dict[str, Entry]:
    """Every entry under ``top`` (``top`` included): type, mode, and the
    content's sha256 / the link's target / nothing for a directory."""
    found: dict[str, Entry] = {}

    def visit(path: Path, rel: str) -> None:
        st = path.lstat()
        mode = oct(stat.S_IMODE(st.st_mode))
        if stat.S_ISLNK(st.st_mode):
            found[rel] = ("link", mode, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            found[rel] = ("dir", mode, None)
            for child in sorted(os.listdir(path)):
                visit(path / child, f"{rel}/{child}")
        elif stat.S_ISREG(st.st_mode):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[rel] = ("file", st.st_size, f"{mode} {digest}")
        else:
            found[rel] = ("other", mode, None)

    visit(top, ".")
    return found


def times(top: Path) -> dict[str, int]:
    """The mtime (ns) of every entry under ``top``, ``top`` included."""
    found = {".": top.lstat().st_mtime_ns}
    for where, dirs, names in os.walk(top):
        for name in dirs + names:
            path = Path(where, name)
            found[str(path.relative_to(top))] = path.lstat().st_mtime_ns
    return found


def no_staging(root: Path) -> bool:
    """No upload staging anywhere under ``root`` (it is made beside or in
    the destination)."""
    return not [
        name
        for _, dirs, names in os.walk(root)
        for name in dirs + names
        if name.startswith(STAGING_PREFIX)
    ]


async def wait_for_no_staging(root: Path) -> None:
    with trio.fail_after(5):
        while not no_staging(root):
            await trio.sleep(0.01)


def copy_listing(root: Path, mtime_step: int = 1) -> dict[str, tuple[object, ...]]:
    """Everything under ``root`` (not root itself) that a copy must keep:
    kind, permission bits, content digest or link target, mtime (in units of
    ``mtime_step`` ns) and which paths are hard links of one another."""
    found: dict[str, tuple[object, ...]] = {}
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            mtime = round(st.st_mtime_ns / mtime_step)
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path), mtime)
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", oct(stat.S_IMODE(st.st_mode)), mtime)
            else:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                first = inodes.setdefault((st.st_dev, st.st_ino), rel)
                found[rel] = ("file", oct(stat.S_IMODE(st.st_mode)), digest, mtime, first)
    return found


def deep_chain(top: Path, levels: int, leaf: bytes = b"leaf", *, name: str = "leaf") -> None:
    """``top/d/d/.../d/NAME`` holding ``leaf``, ``levels`` directories below
    ``top`` (made if missing), made one fd at a time: a path this deep is
    past PATH_MAX, and a walk per path would recurse."""
    top.mkdir(parents=True, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        out = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, leaf)
        os.close(out)
    finally:
        os.close(fd)


def make_file(path: Path, size: int) -> Path:
    block = bytes(range(256)) * 4096  # 1 MiB, not all zeros
    with path.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    return path

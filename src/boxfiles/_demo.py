"""``boxfiles demo``: a round trip through an embedded reference server."""

from __future__ import annotations

import errno
import filecmp
import os
import random
import resource
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

import trio

from ._client import format_bytes, open_client
from ._server import serve_files

MiB = 1024 * 1024

#: Largest small file build_tree makes, plus the block it can spill into.
_SMALL_FILE_SPACE = 8192 + 4096

#: The medium files (1+2+3+4 MiB), the script, links and directories.
_FIXED_SPACE = 11 * MiB

#: The sample tree exists three times at the end: the original, the server's
#: copy (in the same work directory) and the copy brought back out.
_COPIES = 3


class NotEnoughSpace(OSError):
    """The work directory's filesystem has less room than the demo needs."""


def space_needed(*, big_mib: int, small_files: int) -> int:
    """Bytes of free space the demo needs in its work directory (an upper
    bound: each small file at its largest, rounded up a block)."""
    return _COPIES * (big_mib * MiB + small_files * _SMALL_FILE_SPACE + _FIXED_SPACE)


def free_bytes(directory: str) -> int:
    """Free bytes on ``directory``'s filesystem (for an unprivileged user)."""
    return shutil.disk_usage(directory).free


def check_space(directory: str, *, big_mib: int, small_files: int) -> None:
    """Raise NotEnoughSpace naming ``directory`` and both amounts when its
    filesystem has less free space than the demo needs."""
    needed = space_needed(big_mib=big_mib, small_files=small_files)
    free = free_bytes(directory)
    if free < needed:
        raise NotEnoughSpace(
            errno.ENOSPC,
            f"the demo needs {format_bytes(needed)} free here, there is {format_bytes(free)} "
            "(set TMPDIR to a roomier directory, or pass a smaller --big-mib)",
            directory,
        )


def build_tree(base: Path, *, big_mib: int, small_files: int) -> Path:
    """Many small files, a few MiB-sized ones, one big one, symlinks
    (relative, absolute, dangling), a hard link and an empty directory."""
    rng = random.Random(6)
    tree = base / "sample"
    for i in range(small_files):
        folder = tree / "small" / f"group-{i % 20:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"file-{i:05d}.txt").write_bytes(rng.randbytes(rng.randrange(0, 8192)))
    (tree / "medium").mkdir()
    for i, size in enumerate((1, 2, 3, 4)):
        (tree / "medium" / f"blob-{i}.bin").write_bytes(rng.randbytes(size * MiB))
    block = rng.randbytes(MiB)
    with open(tree / "big.bin", "wb") as big:
        for i in range(big_mib):
            # Each MiB differs (its index up front), so a misplaced block shows.
            big.write(i.to_bytes(8, "little") + block[8:])
    (tree / "empty").mkdir()
    (tree / "script.sh").write_bytes(b"#!/bin/sh\necho hello from the box\n")
    (tree / "script.sh").chmod(0o755)
    (tree / "links").mkdir()
    (tree / "links" / "relative").symlink_to("../medium/blob-0.bin")
    (tree / "links" / "absolute").symlink_to("/etc/hostname")
    (tree / "links" / "dangling").symlink_to("nowhere")
    os.link(tree / "medium" / "blob-1.bin", tree / "links" / "hard-blob-1.bin")
    return tree


def _census(tree: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(tree):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return files, size


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two trees: kinds, permission bits, contents,
    link targets, hard links, and mtimes to the nanosecond."""

    def describe(root: Path) -> dict[str, tuple[object, ...]]:
        found: dict[str, tuple[object, ...]] = {}
        # Hard links: every name of an inode, compared as a set (the order
        # a directory lists its names in differs between filesystems).
        inode_of: dict[str, tuple[int, int]] = {}
        names_of: dict[tuple[int, int], list[str]] = {}
        for dirpath, dirs, names in os.walk(root):
            for name in dirs + names:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    found[rel] = ("link", os.readlink(path), st.st_mtime_ns)
                elif stat.S_ISDIR(st.st_mode):
                    found[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
                else:
                    found[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns)
                    inode_of[rel] = (st.st_dev, st.st_ino)
                    names_of.setdefault(inode_of[rel], []).append(rel)
        for rel, inode in inode_of.items():
            found[rel] = (*found[rel], tuple(sorted(names_of[inode])))
        return found

    left, right = describe(a), describe(b)
    problems = [
        f"{rel}: {left.get(rel)} != {right.get(rel)}"
        for rel in sorted(set(left) | set(right))
        if left.get(rel) != right.get(rel)
    ]
    for rel, entry in left.items():
        if entry[0] == "file" and right.get(rel) == entry:
            if not filecmp.cmp(a / rel, b / rel, shallow=False):
                problems.append(f"{rel}: contents differ")
    return problems


def _rate(size: int, seconds: float) -> str:
    return f"{size / MiB / seconds:8.1f} MiB/s" if seconds > 0 else "-"


async def demo(*, big_mib: int = 256, small_files: int = 2000) -> int:
    """Run the demo; return the exit status (1 when the round trip differs).

    On cancellation the server stops and the sample files are removed.
    """
    await trio.to_thread.run_sync(
        lambda: check_space(tempfile.gettempdir(), big_mib=big_mib, small_files=small_files)
    )
    work = Path(tempfile.mkdtemp(prefix="boxfiles-demo-"))
    # A socket path must stay under 108 bytes, whatever TMPDIR is.
    sock_dir = tempfile.mkdtemp(prefix="bfdemo-", dir="/tmp")
    try:
        print(f"building a sample tree in {work} ...", flush=True)
        try:
            tree = await trio.to_thread.run_sync(
                lambda: build_tree(work, big_mib=big_mib, small_files=small_files)
            )
        except OSError as err:
            # A failed write names no file: name the directory it was in.
            if err.filename is None:
                raise OSError(err.errno, err.strerror, str(work)) from err
            raise
        files, size = _census(tree)
        root = work / "box-root"
        root.mkdir()
        out = work / "copied-out"
        async with trio.open_nursery() as nursery:
            address = await nursery.start(serve_files, root, f"unix:{sock_dir}/files.sock")
            async with open_client(address) as client:
                started = time.monotonic()
                await client.copy_in(tree, "/sample")
                seconds_in = time.monotonic() - started
                started = time.monotonic()
                await client.copy_out("/sample", out)
                seconds_out = time.monotonic() - started
            nursery.cancel_scope.cancel()
        problems = await trio.to_thread.run_sync(differences, tree, out)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        print(
            f"\n  {'files':<16}{files:>12}\n"
            f"  {'bytes':<16}{size:>12}  ({size / MiB:.1f} MiB)\n"
            f"  {'copy_in':<16}{seconds_in:>11.2f}s  {_rate(size, seconds_in)}\n"
            f"  {'copy_out':<16}{seconds_out:>11.2f}s  {_rate(size, seconds_out)}\n"
            f"  {'peak RSS':<16}{peak / MiB:>10.1f} MiB  (whole process, server included)\n"
        )
        if problems:
            print(f"round trip NOT exact ({len(problems)} differences):", file=sys.stderr)
            for problem in problems[:20]:
                print(f"  {problem}", file=sys.stderr)
            return 1
        print(
            "round trip exact: contents, directories, symlinks, hard links, modes,"
            " mtimes (to the nanosecond)"
        )
        return 0
    finally:
        with trio.CancelScope(shield=True):  # clean up after Ctrl-C too
            await trio.to_thread.run_sync(lambda: shutil.rmtree(work, ignore_errors=True))
        shutil.rmtree(sock_dir, ignore_errors=True)

"""Placement beyond SPEC's rows: volumes mounted inside the root, trees deeper
than the recursion limit, descriptors bounded whatever the depth, a dead
server's staging, and a server that is not root.

Real mounts, real processes, real limits: we run as root, so nothing here is
skipped unless the kernel refuses the mount.
"""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import boxfiles
from boxfiles._fs import remove_tree
from boxfiles._server._confine import MAX_FDS, STAGING_PREFIX, locate
from boxfiles._server._staging import sweep_stale_staging
from boxfiles._wire import MAX_PATH_BYTES

from ..helpers.archives import Stalling, archive, contents, files, member
from ..helpers.processes import started_process
from ..helpers.servers import download, upload
from ..helpers.trees import deep_chain, listing, no_staging, times

PROMPT = 20  # seconds: generous, the machine is shared
NOBODY = 65534


# -- a tree deeper than the recursion limit, walked without recursion -------


def snapshot(top: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """(type and mode, size, mtime, content) of everything under ``top``,
    walked iteratively (os.walk recurses)."""
    found = {}
    todo = [top]
    while todo:
        path = todo.pop()
        st = path.lstat()
        data = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        found[str(path.relative_to(top))] = (st.st_mode, st.st_size, st.st_mtime_ns, data)
        if stat.S_ISDIR(st.st_mode):
            todo.extend(path / name for name in os.listdir(path))
    return found


@pytest.fixture
def deep_root(root: Path) -> Iterator[Path]:
    """The root, emptied afterwards without recursion: pytest's own clean-up
    of old temporary directories (shutil.rmtree) cannot remove a deep tree."""
    yield root
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in os.listdir(fd):
            remove_tree(fd, name)
    finally:
        os.close(fd)


def chain_path(levels: int) -> str:
    return "/".join(["d"] * levels)


def no_staging_deep(top: Path) -> bool:
    return not [name for name in snapshot(top) if STAGING_PREFIX in name]


DEEP = sys.getrecursionlimit() + 500


async def test_deep_tree_downloads_merges_and_rolls_back(server: str, deep_root: Path) -> None:
    root = deep_root
    (root / "a").write_text("first in a merge")
    deep_chain(root, DEEP)
    data, _ = await download(server, "/", include_parent=False)
    assert contents(data)[f"./{chain_path(DEEP)}/leaf"] == b"leaf"
    assert data is not None

    # Uploaded back onto itself: a merge through every level.
    await upload(server, data, "/", overwrite=True, source_is_dir=True)
    assert (root / chain_path(DEEP) / "leaf").read_bytes() == b"leaf"

    # The same, meeting a conflict at the bottom after replacing "a": all of
    # it is undone, modes and mtimes included, and the staging is gone.
    bottom = root / chain_path(DEEP)
    (bottom / "leaf").unlink()
    (bottom / "leaf").mkdir()
    before = snapshot(root)
    with pytest.raises(boxfiles.FailedPrecondition, match="cannot replace the directory /d/d/"):
        await upload(server, data, "/", overwrite=True, source_is_dir=True)
    assert snapshot(root) == before

    # A dead server's staging holding a deep tree, deep in the root: swept.
    debris = bottom / f"{STAGING_PREFIX}dead" / "tree"
    debris.mkdir(parents=True)
    deep_chain(debris, DEEP)
    assert sweep_stale_staging(root) == [f"{chain_path(DEEP)}/{STAGING_PREFIX}dead"]
    assert snapshot(root).keys() == before.keys()


async def test_dest_path_as_long_as_allowed_then_download(server: str, deep_root: Path) -> None:
    levels = (MAX_PATH_BYTES - len("/f")) // 2  # "/d" per level
    dest = "/" + chain_path(levels) + "/f"
    assert len(dest) <= MAX_PATH_BYTES
    await upload(server, files(f=b"deep"), dest, mkdir_parents=True)
    data, _ = await download(server, "/", include_parent=False)
    assert contents(data) == {f"./{chain_path(levels)}/f": b"deep"}
    # And back again, merged onto itself.
    assert data is not None
    await upload(server, data, "/", overwrite=True, source_is_dir=True)
    assert contents((await download(server, "/", include_parent=False))[0]) == contents(data)


def test_remove_tree_deeper_than_the_recursion_limit(deep_root: Path) -> None:
    (deep_root / "top").mkdir()
    deep_chain(deep_root / "top", DEEP)
    fd = os.open(deep_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_tree(fd, "top")
    finally:
        os.close(fd)
    assert os.listdir(deep_root) == []


def test_created_parents_deeper_than_the_recursion_limit_are_undone(deep_root: Path) -> None:
    root = deep_root
    (root / "etc").mkdir()
    before, before_times = listing(root), times(root)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        dest = locate(root_fd, f"/etc/{chain_path(DEEP)}/x", follow=True, missing="create")
        try:
            assert dest.created is not None
            assert len(dest.created.names) == DEEP
            assert (root / "etc" / chain_path(DEEP)).is_dir()
            dest.created.undo()  # as a failed placement does
        finally:
            dest.close()
    finally:
        os.close(root_fd)
    assert listing(root) == before
    assert times(root) == before_times


# -- descriptors: MAX_FDS whatever the depth ---------------------------------

SERVER = """
import concurrent.futures.thread, os, resource, sys, trio, boxfiles

async def main():
    if sys.argv[4]:
        # Everything is imported; drop to the user (no capabilities left).
        os.setgroups([])
        os.setgid(int(sys.argv[4]))
        os.setuid(int(sys.argv[4]))
    async with trio.open_nursery() as nursery:
        await nursery.start(boxfiles.serve_files, sys.argv[1], sys.argv[2])
        if sys.argv[3]:
            # Room for what is open now, the connection, and MAX_FDS.
            top = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (top + int(sys.argv[3]), hard))
        print("serving", flush=True)

trio.run(main)
"""


@asynccontextmanager
async def server_process(
    root: Path, sock: Path, *, fds: int | None = None, uid: int | None = None
) -> AsyncIterator[trio.Process]:
    """The reference server in a process of its own, up and listening:
    ``fds`` more descriptors allowed than it has open once started; run as
    ``uid`` when given."""
    argv = [sys.executable, "-c", SERVER, str(root), f"unix:{sock}"]
    argv += ["" if fds is None else str(fds), "" if uid is None else str(uid)]
    async with started_process(argv, prompt=PROMPT) as process:
        yield process


async def test_descriptors_are_bounded_whatever_the_depth(deep_root: Path, sock_dir: Path) -> None:
    root = deep_root
    # Deeper than the fd limit the server gets: one fd per level would fail.
    levels = 600
    (root / "a").write_text("first in a merge")
    deep_chain(root, levels)
    sock = sock_dir / "fds.sock"
    # The connection's socket, and one fd trio's thread cache may open.
    async with server_process(root, sock, fds=MAX_FDS + 2):
        target = f"unix:{sock}"
        data, _ = await download(target, "/", include_parent=False)
        assert data is not None
        assert contents(data)[f"./{chain_path(levels)}/leaf"] == b"leaf"
        await upload(target, data, "/", overwrite=True, source_is_dir=True)
        # A conflict at the bottom: rolled back, times included.
        (root / chain_path(levels) / "leaf").unlink()
        (root / chain_path(levels) / "leaf").mkdir()
        before = snapshot(root)
        with pytest.raises(boxfiles.FailedPrecondition, match="cannot replace the directory"):
            await upload(target, data, "/", overwrite=True, source_is_dir=True)
        assert snapshot(root) == before
        # A dest_path as deep, created and placed into.
        deep = "/new/" + chain_path(levels)
        await upload(target, files(f=b"deep"), deep + "/f", mkdir_parents=True)
        assert (root / deep.lstrip("/") / "f").read_bytes() == b"deep"


# -- volumes mounted inside the root ------------------------------------------


def mount_tmpfs(path: Path, *options: str) -> None:
    path.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(["size=16m", *options]), "bf-test", str(path)],
        capture_output=True,
        text=True,
    )
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")


@pytest.fixture
def vol(root: Path) -> Iterator[Path]:
    """A writable tmpfs at ROOT/vol: another filesystem than the root's."""
    path = root / "vol"
    mount_tmpfs(path)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def ro_vol(root: Path) -> Iterator[Path]:
    """A read-only tmpfs at ROOT/ro holding ``site/index.html``."""
    path = root / "ro"
    mount_tmpfs(path)
    try:
        (path / "site").mkdir()
        (path / "site" / "index.html").write_text("old")
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


async def test_uploads_into_a_mounted_volume(server: str, root: Path, vol: Path) -> None:
    assert os.stat(vol).st_dev != os.stat(root).st_dev
    # A file to a new path, a tree to a new directory, a merge into the
    # volume itself, a file replaced in it.
    await upload(
        server, files(**{"index.html": b"<p>"}), "/vol/site/index.html", mkdir_parents=True
    )
    await upload(server, files(**{"a/b": b"1", "c": b"2"}), "/vol/tree", source_is_dir=True)
    await upload(server, files(**{"site/more": b"3", "top": b"4"}), "/vol", source_is_dir=True)
    await upload(server, files(top=b"5"), "/vol/top", overwrite=True)
    assert (vol / "site" / "index.html").read_bytes() == b"<p>"
    assert (vol / "site" / "more").read_bytes() == b"3"
    assert (vol / "tree" / "a" / "b").read_bytes() == b"1"
    assert (vol / "top").read_bytes() == b"5"
    assert no_staging(root)
    data, _ = await download(server, "/vol/.", include_parent=False)
    assert sorted(contents(data)) == [
        "./site/index.html",
        "./site/more",
        "./top",
        "./tree/a/b",
        "./tree/c",
    ]


async def test_a_merge_crosses_into_a_mounted_volume(server: str, root: Path, vol: Path) -> None:
    # Staged on the root's filesystem, placed partly into the volume: what
    # goes there is copied onto its mount first, then renamed into place.
    (vol / "old").write_text("old")
    (root / "z").mkdir()
    tree = archive(
        member("a", b"root fs"),
        member("vol/new/", type=tarfile.DIRTYPE, mode=0o750),
        member("vol/new/f", b"new", mode=0o640),
        member("vol/new/l", type=tarfile.SYMTYPE, linkname="f"),
        member("vol/old", b"replaced"),
    )
    await upload(server, tree, "/", source_is_dir=True, overwrite=True)
    assert (root / "a").read_bytes() == b"root fs"
    assert (vol / "new" / "f").read_bytes() == b"new"
    assert os.readlink(vol / "new" / "l") == "f"
    assert stat.S_IMODE((vol / "new").stat().st_mode) == 0o750
    assert (vol / "new").stat().st_mtime == 1_600_000_000
    assert (vol / "old").read_bytes() == b"replaced"
    assert no_staging(root)

    # The same crossing, then a conflict ("z" comes last): all undone, the
    # volume's own times included, and no staging left on either mount.
    before, before_times = listing(root), times(root)
    tree = archive(
        member("a", b"again"),
        member("vol/more", b"more"),
        member("vol/old", b"again"),
        member("z", b"a file onto a directory"),
    )
    with pytest.raises(boxfiles.FailedPrecondition, match="cannot replace the directory /z"):
        await upload(server, tree, "/", source_is_dir=True, overwrite=True)
    assert listing(root) == before
    assert times(root) == before_times


async def test_upload_staged_in_a_volume_is_hidden_and_refused(
    server: str, root: Path, vol: Path
) -> None:
    # While an upload into the volume is in flight, its staging is in the
    # volume: a download there does not show it.
    async with trio.open_nursery() as nursery:

        async def stalled() -> None:
            async with boxfiles.open_client(server) as client:
                await client.upload_tar(Stalling(files(x=b"x" * 100_000)[:-2048]), "/vol/x")

        nursery.start_soon(stalled)
        with trio.fail_after(PROMPT):
            while not [n for n in os.listdir(vol) if n.startswith(STAGING_PREFIX)]:
                await trio.sleep(0.01)
        data, _ = await download(server, "/vol/.", include_parent=False)
        assert [m for m in names_of(data) if m != "."] == []
        nursery.cancel_scope.cancel()
    with trio.fail_after(5):
        while not no_staging(root):
            await trio.sleep(0.01)


def names_of(data: bytes | None) -> list[str]:
    assert data is not None
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


@pytest.mark.parametrize(
    ("data", "dest", "options"),
    [
        (files(**{"index.html": b"new"}), "/ro/site/index.html", {"overwrite": True}),
        (files(**{"a/b": b"1"}), "/ro/site", {"source_is_dir": True, "overwrite": True}),
        (files(**{"a/b": b"1"}), "/ro/new/deeper", {"mkdir_parents": True}),
    ],
)
async def test_read_only_volume_is_permission_denied(
    server: str, root: Path, ro_vol: Path, data: bytes, dest: str, options: dict[str, bool]
) -> None:
    before, before_times = listing(root), times(root)
    with pytest.raises(boxfiles.PermissionDenied, match=f"{dest}: Read-only file system"):
        await upload(server, data, dest, **options)
    assert listing(root) == before
    assert times(root) == before_times


# -- a dead server's staging, a live server's staging --------------------------


async def wait_for_staging(top: Path) -> None:
    with trio.fail_after(PROMPT):
        while no_staging(top):
            await trio.sleep(0.01)


async def test_restart_after_sigkill_sweeps_at_once(root: Path, sock_dir: Path) -> None:
    (root / "data").mkdir()
    sock = sock_dir / "killed.sock"
    async with server_process(root, sock) as process:
        async with trio.open_nursery() as nursery:

            async def stalled() -> None:
                big = Stalling(files(x=b"x" * 300_000)[:-2048])
                async with boxfiles.open_client(f"unix:{sock}") as client:
                    with pytest.raises(boxfiles.FilesError):
                        await client.upload_tar(big, "/data/x")

            nursery.start_soon(stalled)
            await wait_for_staging(root)
            process.send_signal(signal.SIGKILL)
            await process.wait()
    assert not no_staging(root)  # the dead server's debris, seconds old
    async with server_process(root, sock):
        assert no_staging(root)
    assert sorted(os.listdir(root / "data")) == []


async def test_a_live_servers_staging_is_kept(root: Path, sock_dir: Path) -> None:
    (root / "data").mkdir()
    sock = sock_dir / "live.sock"
    async with server_process(root, sock):
        async with trio.open_nursery() as nursery:

            async def stalled() -> None:
                async with boxfiles.open_client(f"unix:{sock}") as client:
                    await client.upload_tar(Stalling(files(x=b"x" * 300_000)[:-2048]), "/data/x")

            nursery.start_soon(stalled)
            await wait_for_staging(root)
            staged = os.listdir(root / "data")
            # A second server starting on the same root sweeps around it.
            async with server_process(root, sock_dir / "second.sock"):
                pass
            assert os.listdir(root / "data") == staged
            nursery.cancel_scope.cancel()


async def test_a_failed_upload_keeps_what_another_changed_beside_its_staging(
    server: str, root: Path
) -> None:
    (root / "data").mkdir()
    os.utime(root / "data", (1_600_000_000, 1_600_000_000))
    async with trio.open_nursery() as nursery:

        async def stalled() -> None:
            async with boxfiles.open_client(server) as client:
                await client.upload_tar(Stalling(files(x=b"x" * 100_000)[:-2048]), "/data/x")

        nursery.start_soon(stalled)
        await wait_for_staging(root)  # in /data
        await upload(server, files(b=b"1"), "/data/b")
        changed = (root / "data").stat().st_mtime_ns
        nursery.cancel_scope.cancel()
    with trio.fail_after(5):
        while not no_staging(root):
            await trio.sleep(0.01)
    # The cancelled upload's staging came and went; /data keeps the time of
    # the upload that did change it (or later), not the time before both.
    assert (root / "data").stat().st_mtime_ns >= changed
    assert os.listdir(root / "data") == ["b"]


# -- a server that is not root: restrictive modes come last -------------------


@pytest.fixture
def nobody_root() -> Iterator[Path]:
    """A root owned by nobody, on a path nobody can reach."""
    top = Path(os.environ.get("TMPDIR", "/tmp")) / f"bf-nobody-{os.getpid()}"
    top.mkdir(mode=0o755)
    root = top / "root"
    root.mkdir()
    os.chown(root, NOBODY, NOBODY)
    try:
        yield root
    finally:
        subprocess.run(["rm", "-rf", str(top)], check=True)


async def test_server_without_root_places_read_only_directories(
    nobody_root: Path, sock_dir: Path
) -> None:
    os.chmod(sock_dir, 0o777)  # nobody creates its socket here
    (nobody_root / "data").mkdir()
    os.chown(nobody_root / "data", NOBODY, NOBODY)
    (nobody_root / "shared").mkdir()
    os.chmod(nobody_root / "shared", 0o777)  # root's, writable by all
    (nobody_root / "shared" / "f").write_text("root's")
    tree = archive(
        member("ro/", type=tarfile.DIRTYPE, mode=0o555),
        member("ro/sub/", type=tarfile.DIRTYPE, mode=0o500),
        member("ro/sub/f", b"content", mode=0o444),
        member("ro/g", b"more", mode=0o644),
    )
    sock = sock_dir / "nobody.sock"
    async with server_process(nobody_root, sock, uid=NOBODY):
        target = f"unix:{sock}"
        await upload(target, tree, "/data/new", source_is_dir=True)  # a new directory
        await upload(target, tree, "/data", source_is_dir=True)  # merged into one
        # Refused once in place: rolled back without a trace. With overwrite,
        # replacing ro/g needs write permission on the read-only ro/.
        before, before_times = listing(nobody_root), times(nobody_root)
        with pytest.raises(boxfiles.AlreadyExists):
            await upload(target, tree, "/data", source_is_dir=True, overwrite=False)
        with pytest.raises(boxfiles.PermissionDenied):
            await upload(target, tree, "/data", source_is_dir=True, overwrite=True)
        assert listing(nobody_root) == before
        assert times(nobody_root) == before_times
        # A directory it may write but not own (its times cannot be put
        # back): "a" is placed, then "f" refused and "a" undone; the refusal
        # is still the one the client gets.
        with pytest.raises(boxfiles.AlreadyExists, match="already exists: /shared/f"):
            await upload(target, files(a=b"1", f=b"2"), "/shared", overwrite=False)
        assert sorted(os.listdir(nobody_root / "shared")) == ["f"]
    for top in (nobody_root / "data" / "new", nobody_root / "data"):
        assert stat.S_IMODE((top / "ro").stat().st_mode) == 0o555
        assert stat.S_IMODE((top / "ro" / "sub").stat().st_mode) == 0o500
        assert (top / "ro" / "sub" / "f").read_bytes() == b"content"
        assert (top / "ro" / "g").read_bytes() == b"more"
        assert (top / "ro").stat().st_uid == NOBODY
    assert no_staging(nobody_root)


# -- a file that shrinks while it is downloaded --------------------------------


async def test_a_file_that_shrinks_fails_the_download(server: str, root: Path) -> None:
    size = 64 * 1024 * 1024  # far more than the channel and flow-control windows hold
    with open(root / "big", "wb") as f:
        f.truncate(size)
    received = 0

    class Shrinking:
        async def write(self, data: bytes) -> None:
            nonlocal received
            if not received:
                os.truncate(root / "big", 1024)
            received += len(data)

    async with boxfiles.open_client(server) as client:
        with pytest.raises(boxfiles.Internal, match="big shrank while being read") as info:
            await client.download_tar("/big", Shrinking())
    assert info.value.status == boxfiles.Status.ABORTED
    assert received < size

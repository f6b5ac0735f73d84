"""The reference server, row by row of docs/contract.md's table, through a real client."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import trio

import boxfiles
from boxfiles._aio import open_channel
from boxfiles._proto.files_pb2 import DownloadRequest, UploadChunk
from boxfiles._server._confine import STAGING_PREFIX
from boxfiles._tar._read import MAX_ENTRY_HEADER_BYTES
from boxfiles._tar._rules import MAX_DEPTH
from boxfiles._target import UnixTarget
from boxfiles._wire import DOWNLOAD, UPLOAD

from ..helpers import tarshapes
from ..helpers.archives import Stalling, archive, files, member, names
from ..helpers.servers import download, expect_unchanged, serving, upload
from ..helpers.trees import listing, no_staging, wait_for_no_staging

MiB = 1024 * 1024


def huge_pax_header(name: str) -> tuple[tarfile.TarInfo, bytes]:
    info, data = member(name, b"x")
    info.pax_headers = {"comment": "c" * (MAX_ENTRY_HEADER_BYTES + 1)}
    return info, data


@pytest.fixture
def tree(root: Path) -> Path:
    """A small existing tree in the root, so 'unchanged' means something."""
    (root / "etc").mkdir()
    (root / "etc" / "conf").write_text("original")
    (root / "data").mkdir()
    (root / "data" / "keep").write_bytes(b"k" * 100)
    return root


# -- rows ---------------------------------------------------------------------


async def raw_upload(target: str, *chunks: UploadChunk) -> None:
    async with open_channel(UnixTarget(target.removeprefix("unix:"))) as channel:
        async with channel.open_call(UPLOAD) as call:
            for chunk in chunks:
                await call.send(chunk)
            await call.end()
            await call.recv()
            await call.finish()


async def test_empty_stream(server: str, tree: Path) -> None:
    before = listing(tree)
    with pytest.raises(boxfiles.InvalidArgument, match="empty upload stream"):
        await raw_upload(server)
    assert listing(tree) == before


async def test_missing_dest_path(server: str, tree: Path) -> None:
    before = listing(tree)
    with pytest.raises(boxfiles.InvalidArgument, match="dest_path is required in first chunk"):
        await raw_upload(server, UploadChunk(data=files(a=b"x"), mkdir_parents=True))
    assert listing(tree) == before


@pytest.mark.parametrize("dest", ["/data/../etc/x", "../x", "/a/.."])
async def test_dotdot_in_dest_path(server: str, tree: Path, dest: str) -> None:
    await expect_unchanged(
        tree,
        boxfiles.InvalidArgument,
        f"path must not contain ..: {dest}",
        server,
        files(a=b"x"),
        dest,
    )


@pytest.mark.parametrize("src", ["/data/../etc", "..", "/data/.."])
async def test_dotdot_in_src_path(server: str, tree: Path, src: str) -> None:
    with pytest.raises(boxfiles.InvalidArgument, match=f"path must not contain ..: {src}"):
        await download(server, src)


async def test_empty_src_path(server: str) -> None:
    async with open_channel(UnixTarget(server.removeprefix("unix:"))) as channel:
        async with channel.open_call(DOWNLOAD) as call:
            await call.send(DownloadRequest(src_path=""), end=True)
            with pytest.raises(boxfiles.InvalidArgument, match="src_path is required"):
                await call.recv()


async def test_unknown_container(server: str, tree: Path) -> None:
    await expect_unchanged(
        tree,
        boxfiles.FailedPrecondition,
        "^FAILED_PRECONDITION: container not found: nope$",
        server,
        files(a=b"x"),
        "/a",
        container_id="nope",
    )
    with pytest.raises(boxfiles.FailedPrecondition, match="container not found: nope"):
        await download(server, "/etc", container_id="nope")


@pytest.mark.parametrize("src", ["/missing", "/etc/missing", "/missing/deeper", "/etc/conf/."])
async def test_missing_download_source(server: str, tree: Path, src: str) -> None:
    with pytest.raises(boxfiles.NotFound, match=src.removesuffix("/.")):
        await download(server, src)


@pytest.mark.parametrize(
    ("data", "dest", "missing"),
    [
        pytest.param(files(f=b"x"), "/nope/f", "/nope", id="file"),
        pytest.param(files(**{"d/f": b"x"}), "/nope/deeper/d", "/nope", id="dir"),
        pytest.param(files(f=b"x"), "/etc/nope/deeper/", "/etc/nope", id="trailing-slash"),
    ],
)
async def test_parent_missing_without_mkdir_parents(
    server: str, tree: Path, data: bytes, dest: str, missing: str
) -> None:
    await expect_unchanged(
        tree,
        boxfiles.NotFound,
        f"no such directory: {missing}$",
        server,
        data,
        dest,
        mkdir_parents=False,
    )


async def test_mkdir_parents_creates_them(server: str, tree: Path) -> None:
    await upload(server, files(f=b"x"), "/new/deeper/f", mkdir_parents=True)
    assert (tree / "new" / "deeper" / "f").read_bytes() == b"x"
    await upload(server, files(g=b"y"), "/etc/sub", mkdir_parents=False, source_is_dir=True)
    assert (tree / "etc" / "sub" / "g").read_bytes() == b"y"


@pytest.mark.parametrize(
    ("data", "dest", "existing"),
    [
        pytest.param(files(conf=b"new"), "/etc/conf", "/etc/conf", id="file-onto-file"),
        pytest.param(files(conf=b"new"), "/etc", "/etc/conf", id="file-into-dir"),
        # The merge moves a/ first, then meets data/keep: all of it is undone.
        pytest.param(
            files(**{"a/x": b"1", "keep": b"2", "z": b"3"}), "/data", "/data/keep", id="dir-merge"
        ),
    ],
)
async def test_exists_without_overwrite(
    server: str, tree: Path, data: bytes, dest: str, existing: str
) -> None:
    await expect_unchanged(
        tree,
        boxfiles.AlreadyExists,
        f"already exists: {existing}$",
        server,
        data,
        dest,
        overwrite=False,
    )


async def test_overwrite_replaces(server: str, tree: Path) -> None:
    await upload(server, files(conf=b"new"), "/etc/conf", overwrite=True)
    assert (tree / "etc" / "conf").read_text() == "new"
    await upload(server, files(**{"keep": b"2", "z": b"3"}), "/data", overwrite=True)
    assert (tree / "data" / "keep").read_bytes() == b"2"
    assert (tree / "data" / "z").read_bytes() == b"3"


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(
    ("data", "dest", "existing"),
    [
        # A directory archive onto a file: refused, not a tree in its place.
        pytest.param(files(**{"d/x": b"1"}), "/etc/conf", "/etc/conf", id="dir-onto-file"),
        pytest.param(files(x=b"1"), "/etc/conf", "/etc/conf", id="contents-onto-file"),
        # In a merge: the archive's directory where the tree has a file...
        pytest.param(files(**{"keep/x": b"1"}), "/data", "/data/keep", id="merge-dir-onto-file"),
        # ...and a tree symlink counts as a file (a merge does not follow it).
        pytest.param(files(**{"link/x": b"1"}), "/data", "/data/link", id="merge-dir-onto-link"),
    ],
)
async def test_directory_never_replaces_a_file(
    server: str, tree: Path, data: bytes, dest: str, existing: str, overwrite: bool
) -> None:
    (tree / "data" / "link").symlink_to("keep")
    await expect_unchanged(
        tree,
        boxfiles.FailedPrecondition,
        f"cannot replace the non-directory {existing} with a directory",
        server,
        data,
        dest,
        overwrite=overwrite,
        source_is_dir=True,
    )


@pytest.mark.parametrize("overwrite", [False, True])
async def test_file_never_replaces_a_directory_in_a_merge(
    server: str, tree: Path, overwrite: bool
) -> None:
    (tree / "data" / "sub").mkdir()
    await expect_unchanged(
        tree,
        boxfiles.FailedPrecondition,
        "cannot replace the directory /data/sub with a non-directory",
        server,
        files(a=b"new", sub=b"file"),
        "/data",
        overwrite=overwrite,
        source_is_dir=True,
    )


async def test_directory_is_not_replaced_by_a_file(server: str, tree: Path) -> None:
    (tree / "data" / "keep").unlink()
    (tree / "data" / "keep").mkdir()
    await expect_unchanged(
        tree,
        boxfiles.FailedPrecondition,
        "cannot replace the directory /data/keep",
        server,
        files(keep=b"1"),
        "/data",
        source_is_dir=True,
    )


HOSTILE = [
    pytest.param(archive(member("../x", b"x")), "../x", id="dotdot"),
    pytest.param(archive(member("/abs", b"x")), "/abs", id="absolute"),
    pytest.param(archive(member("a/../../x", b"x")), "a/../../x", id="dotdot-inside"),
    pytest.param(
        archive(member("ok", b"fine"), member("a/../b", b"x")), "a/../b", id="late-dotdot"
    ),
    pytest.param(
        archive(member("evil", type=tarfile.SYMTYPE, linkname="/"), member("evil/pwned", b"x")),
        "evil/pwned",
        id="through-absolute-symlink",
    ),
    pytest.param(
        archive(
            member("evil", type=tarfile.SYMTYPE, linkname="../../.."), member("evil/pwned", b"x")
        ),
        "evil/pwned",
        id="through-relative-symlink",
    ),
    pytest.param(
        archive(member("passwd", type=tarfile.LNKTYPE, linkname="/etc/passwd")),
        "/etc/passwd",
        id="hardlink-absolute",
    ),
    pytest.param(
        archive(member("x", type=tarfile.LNKTYPE, linkname="../../outside")),
        "../../outside",
        id="hardlink-dotdot",
    ),
    pytest.param(
        # /etc/conf exists in the root, but not in the archive: a hard link
        # may only join entries of the same archive.
        archive(member("x", type=tarfile.LNKTYPE, linkname="etc/conf")),
        "etc/conf, which is not in the archive",
        id="hardlink-to-existing-tree",
    ),
    pytest.param(
        archive(
            member("evil", type=tarfile.SYMTYPE, linkname="/etc"),
            member("x", type=tarfile.LNKTYPE, linkname="evil/conf"),
        ),
        "symlink evil",
        id="hardlink-through-symlink",
    ),
    pytest.param(archive(member("null", type=tarfile.CHRTYPE)), "null: device", id="char-device"),
    pytest.param(archive(member("sda", type=tarfile.BLKTYPE)), "sda: device", id="block-device"),
    pytest.param(archive(member("pipe", type=tarfile.FIFOTYPE)), "pipe: device", id="fifo"),
    pytest.param(
        # A PAX header is read whole into memory: one over the bound is refused.
        archive(member("ok", b"fine"), huge_pax_header("f")),
        "bytes of extension",
        id="huge-pax-header",
    ),
]


RESERVED = f"{STAGING_PREFIX}0123456789abcdef"


@pytest.mark.parametrize(
    ("data", "named"),
    [
        # Anywhere in an entry's name, a hard link's or a symlink's target.
        pytest.param(files(**{f"{RESERVED}/tree/x": b"x"}), f"{RESERVED}/tree/x", id="top"),
        pytest.param(files(**{f"a/{RESERVED}": b"x"}), f"a/{RESERVED}", id="last"),
        pytest.param(files(**{f"./a/{RESERVED}/b": b"x"}), f"a/{RESERVED}/b", id="middle"),
        pytest.param(
            archive(member(f"{RESERVED}/", type=tarfile.DIRTYPE)), RESERVED, id="directory"
        ),
        pytest.param(
            archive(member("l", type=tarfile.SYMTYPE, linkname=f"../{RESERVED}/tree")),
            f"entry l \\(a link to ../{RESERVED}/tree\\)",
            id="symlink-target",
        ),
        pytest.param(
            archive(member("f", b"x"), member("h", type=tarfile.LNKTYPE, linkname=f"{RESERVED}")),
            f"hard link h -> {RESERVED}",
            id="hardlink-target",
        ),
    ],
)
async def test_reserved_names_in_an_archive_are_refused(
    server: str, tree: Path, data: bytes, named: str
) -> None:
    await expect_unchanged(
        tree,
        boxfiles.InvalidArgument,
        f"^INVALID_ARGUMENT: archive .*{named}.* is reserved for upload staging",
        server,
        data,
        "/",
        source_is_dir=True,
    )


@pytest.mark.parametrize(("data", "named"), HOSTILE)
async def test_hostile_archive_is_refused(
    server: str, tree: Path, tmp_path: Path, data: bytes, named: str
) -> None:
    outside = listing(tmp_path)
    await expect_unchanged(
        tree, boxfiles.InvalidArgument, f"^INVALID_ARGUMENT: .*{named}", server, data, "/data"
    )
    assert listing(tmp_path) == outside  # nothing appeared next to the root either


def truncated() -> bytes:
    whole = files(big=os.urandom(100_000))
    return whole[:50_000]


@pytest.mark.parametrize(
    ("data", "named"),
    [
        pytest.param(truncated(), "entry big", id="truncated-in-data"),
        pytest.param(
            files(a=b"x" * 600, b=b"y")[:1536], "end-of-archive", id="truncated-at-header"
        ),
        pytest.param(files(a=b"x")[:1024], "without its end-of-archive blocks", id="no-end-block"),
        pytest.param(b"\x07" * 3000, "not a tar archive", id="garbage"),
        pytest.param(files(a=b"x")[:700], "after a", id="partial-data"),
        pytest.param(files(a=b"x")[:300], "not a tar archive", id="partial-header"),
        pytest.param(b"", "not a tar archive", id="empty"),
    ],
)
async def test_truncated_or_corrupt_archive(
    server: str, tree: Path, data: bytes, named: str
) -> None:
    await expect_unchanged(tree, boxfiles.InvalidArgument, named, server, data, "/data/new")


async def test_upload_over_the_cap(root: Path, sock_dir: Path) -> None:
    (root / "keep").write_text("k")
    async with serving(root, sock_dir, max_upload_bytes=64 * 1024) as target:
        await expect_unchanged(
            root,
            boxfiles.ResourceExhausted,
            "exceeds the limit of 65536 bytes",
            target,
            files(big=os.urandom(200_000)),
            "/big",
        )
        await upload(target, files(small=b"s" * 1000), "/small")  # under it: fine
    assert (root / "small").read_bytes() == b"s" * 1000


async def test_cancelled_upload_leaves_nothing(server: str, tree: Path) -> None:
    before = listing(tree)
    data = files(a=b"a" * 300_000, b=b"b" * 300_000)
    async with boxfiles.open_client(server) as client:
        with trio.move_on_after(0.5) as scope:
            # All but the end-of-archive blocks: "a" is staged, "b" is not.
            await client.upload_tar(Stalling(data[:-2048]), "/data", chunk_size=65536)
        assert scope.cancelled_caught
        await wait_for_no_staging(tree)
    assert listing(tree) == before


async def test_connection_dropped_mid_upload_leaves_nothing(root: Path, sock_dir: Path) -> None:
    (root / "keep").write_text("k")
    before = listing(root)
    async with serving(root, sock_dir) as target:
        with trio.move_on_after(0.5):
            # The whole client, connection included, goes away mid-stream.
            async with boxfiles.open_client(target) as client:
                await client.upload_tar(Stalling(files(a=b"a" * 500_000)[:-2048]), "/x")
        await wait_for_no_staging(root)
        assert listing(root) == before
        await upload(target, files(a=b"fine"), "/a")  # the server is still well
    assert (root / "a").read_bytes() == b"fine"


async def test_success(server: str, tree: Path) -> None:
    await upload(server, files(**{"x/y": b"1", "z": b"2"}), "/data/new")
    assert (tree / "data" / "new" / "x" / "y").read_bytes() == b"1"
    assert (tree / "data" / "new" / "z").read_bytes() == b"2"
    assert (tree / "data" / "keep").exists()
    assert no_staging(tree)


async def test_staging_is_never_downloaded(server: str, root: Path) -> None:
    (root / f"{STAGING_PREFIX}leftover").mkdir()
    (root / "f").write_text("f")
    data, is_dir = await download(server, "/", include_parent=False)
    assert is_dir is True
    assert names(data) == [".", "./f"]


async def test_client_deadline_leaves_nothing(server: str, tree: Path) -> None:
    before = listing(tree)
    async with boxfiles.open_client(server, timeout=0.5) as client:
        with pytest.raises(boxfiles.DeadlineExceeded):
            await client.upload_tar(Stalling(files(a=b"a" * 100_000)[:-2048]), "/data")
    await wait_for_no_staging(tree)
    assert listing(tree) == before


@pytest.mark.parametrize(
    "path",
    [
        f"/{STAGING_PREFIX}x/tree",
        f"{STAGING_PREFIX}1",
        f"//{STAGING_PREFIX}",
        f"./{STAGING_PREFIX}2",
        f"/./{STAGING_PREFIX}3",
        f"/data/{STAGING_PREFIX}4",
        f"/data/{STAGING_PREFIX}5/x",
    ],
)
async def test_staging_names_are_reserved(server: str, tree: Path, path: str) -> None:
    await expect_unchanged(
        tree, boxfiles.InvalidArgument, "reserved for upload staging", server, files(a=b"x"), path
    )
    with pytest.raises(boxfiles.InvalidArgument, match="reserved for upload staging"):
        await download(server, path)


def gnu_tar() -> bool:
    tar = shutil.which("tar")
    if tar is None:
        return False
    return "GNU tar" in subprocess.run([tar, "--version"], capture_output=True, text=True).stdout


@pytest.mark.skipif(not gnu_tar(), reason="needs GNU tar to write sparse archive members")
@pytest.mark.parametrize("tar_format", ["gnu", "posix"])
async def test_sparse_member_is_refused(
    server: str, tree: Path, tmp_path: Path, tar_format: str
) -> None:
    # Sparse members expand a small archive into writes of holes; our packer
    # never writes them, so every form is refused by name.
    holes = tmp_path / "holes"
    with open(holes, "wb") as f:
        f.seek(3 * MiB)
        f.write(b"middle")
        f.seek(8 * MiB)
        f.write(b"end")
    made = await trio.run_process(
        ["tar", "--sparse", f"--format={tar_format}", "-cf", "-", "-C", str(tmp_path), "holes"],
        capture_stdout=True,
    )
    data = made.stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getmembers()[0].sparse is not None  # what this test is about
    await expect_unchanged(tree, boxfiles.InvalidArgument, "sparse", server, data, "/data/holes")


@pytest.mark.parametrize(("name", "shape"), sorted(tarshapes.corrupt_shapes().items()))
async def test_corrupt_archive_is_refused_naming_the_offset(
    server: str, tree: Path, name: str, shape: tuple[bytes, str]
) -> None:
    data, named = shape
    await expect_unchanged(
        tree, boxfiles.InvalidArgument, f"^INVALID_ARGUMENT: .*{named}", server, data, "/data"
    )
    await expect_unchanged(tree, boxfiles.InvalidArgument, named, server, data, "/data/ok")


@pytest.mark.parametrize(("name", "data"), sorted(tarshapes.truncated_shapes().items()))
async def test_archive_without_end_marker_is_refused(
    server: str, tree: Path, name: str, data: bytes
) -> None:
    await expect_unchanged(
        tree, boxfiles.InvalidArgument, "end-of-archive blocks", server, data, "/data/ok"
    )


async def test_valid_end_and_long_headers_are_accepted(server: str, root: Path) -> None:
    # The control for the shapes above: the same member, ended properly and
    # padded with zeros to a 10 KiB record, is placed.
    data = tarshapes.whole(tarshapes.member_bytes("ok", b"fine"))
    await upload(server, data + b"\0" * (10240 - len(data)), "/ok")
    assert (root / "ok").read_bytes() == b"fine"
    await upload(server, tarshapes.long_name_archive(), "/long", source_is_dir=True)
    (placed,) = [p for p in (root / "long").rglob("*") if p.is_file()]
    assert placed.relative_to(root / "long") == Path("/".join(["n" * 200] * 20))


async def test_deeply_nested_entry_is_invalid_argument(server: str, tree: Path) -> None:
    deep = "/".join(["d"] * MAX_DEPTH) + "/f"  # one deeper than allowed
    await expect_unchanged(
        tree,
        boxfiles.InvalidArgument,
        "nested deeper",
        server,
        archive(member(deep, b"x")),
        "/data",
    )


async def test_absurd_mtime_is_invalid_argument(server: str, tree: Path) -> None:
    await expect_unchanged(
        tree,
        boxfiles.InvalidArgument,
        "entry when",
        server,
        archive(member("when", b"x", mtime=10**30)),
        "/data/when",
    )


@pytest.mark.parametrize(
    ("kind", "mtime"),
    [(tarfile.REGTYPE, "nan"), (tarfile.REGTYPE, "1e400"), (tarfile.DIRTYPE, "9" * 20)],
)
async def test_absurd_pax_mtime_is_invalid_argument(
    server: str, tree: Path, kind: bytes, mtime: str
) -> None:
    info, data = member("when", b"x" if kind == tarfile.REGTYPE else b"", type=kind)
    info.pax_headers = {"mtime": mtime}
    await expect_unchanged(
        tree, boxfiles.InvalidArgument, "when", server, archive((info, data)), "/data/when"
    )


async def test_replacements_are_undone_when_a_later_step_fails(server: str, tree: Path) -> None:
    (tree / "data" / "a").write_text("old")
    (tree / "data" / "z").mkdir()
    # "a" is replaced first (sorted order); then "z" cannot be: all undone.
    await expect_unchanged(
        tree,
        boxfiles.FailedPrecondition,
        "cannot replace the directory /data/z",
        server,
        files(a=b"new", z=b"file"),
        "/data",
        overwrite=True,
        source_is_dir=True,
    )
    assert (tree / "data" / "a").read_text() == "old"

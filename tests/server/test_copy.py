"""docker-cp copy semantics of the reference server, upload and download."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

import boxfiles
from boxfiles._aio import open_channel
from boxfiles._proto.files_pb2 import DownloadChunk, DownloadRequest
from boxfiles._target import UnixTarget
from boxfiles._wire import DOWNLOAD

from ..helpers.archives import archive, contents, files, member, names
from ..helpers.servers import download, expect_unchanged, upload

DIR_ARCHIVE = archive(
    member("./", type=tarfile.DIRTYPE, mode=0o750),
    member("./a", b"A"),
    member("./sub/", type=tarfile.DIRTYPE),
    member("./sub/b", b"B"),
)


async def test_single_file_onto_a_new_path_becomes_that_path(server: str, root: Path) -> None:
    await upload(server, files(original=b"x"), "/renamed")
    assert (root / "renamed").read_bytes() == b"x"
    assert not (root / "original").exists()


async def test_single_file_onto_a_file_replaces_it(server: str, root: Path) -> None:
    (root / "f").write_text("old")
    await upload(server, files(other=b"new"), "/f")
    assert (root / "f").read_bytes() == b"new"


async def test_single_file_onto_a_directory_lands_inside_by_basename(
    server: str, root: Path
) -> None:
    (root / "d").mkdir()
    await upload(server, files(f=b"x"), "/d")
    assert (root / "d" / "f").read_bytes() == b"x"


async def test_trailing_slash_forces_directory(server: str, root: Path) -> None:
    await upload(server, files(f=b"x"), "/newdir/")
    assert (root / "newdir" / "f").read_bytes() == b"x"


async def test_source_is_dir_true_is_honoured(server: str, root: Path) -> None:
    await upload(server, files(f=b"x"), "/asdir", source_is_dir=True)
    assert (root / "asdir" / "f").read_bytes() == b"x"


async def test_source_is_dir_false_with_a_directory_archive(server: str, root: Path) -> None:
    await expect_unchanged(
        root,
        boxfiles.InvalidArgument,
        "source_is_dir is false",
        server,
        DIR_ARCHIVE,
        "/d",
        source_is_dir=False,
    )


async def test_source_is_dir_false_with_a_file(server: str, root: Path) -> None:
    await upload(server, files(f=b"x"), "/g", source_is_dir=False)
    assert (root / "g").read_bytes() == b"x"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(DIR_ARCHIVE, id="dot-rooted"),
        pytest.param(files(a=b"A", **{"sub/b": b"B"}), id="several-entries"),
    ],
)
async def test_directory_archive_detected_when_unset(server: str, root: Path, data: bytes) -> None:
    await upload(server, data, "/made/here")
    assert (root / "made" / "here" / "a").read_bytes() == b"A"
    assert (root / "made" / "here" / "sub" / "b").read_bytes() == b"B"


async def test_dot_entry_gives_the_destination_its_mode(server: str, root: Path) -> None:
    await upload(server, DIR_ARCHIVE, "/d")
    assert (root / "d").stat().st_mode & 0o777 == 0o750


async def test_directory_archive_merges_into_an_existing_directory(server: str, root: Path) -> None:
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "sub" / "old").write_text("o")
    await upload(server, DIR_ARCHIVE, "/d")
    assert sorted(p.name for p in (root / "d" / "sub").iterdir()) == ["b", "old"]


async def test_destination_through_a_symlink_inside_the_root(server: str, root: Path) -> None:
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    await upload(server, files(libc=b"c"), "/lib/libc")
    assert (root / "usr" / "lib" / "libc").read_bytes() == b"c"
    assert (root / "lib").is_symlink()


@pytest.fixture
def source(root: Path) -> Path:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "a").write_bytes(b"A")
    (root / "dir" / "sub" / "b").write_bytes(b"B")
    (root / "file").write_bytes(b"F")
    (root / "dir" / "link").symlink_to("a")
    (root / "filelink").symlink_to("/file")
    (root / "dirlink").symlink_to("dir")
    return root


async def test_download_a_file(server: str, source: Path) -> None:
    data, is_dir = await download(server, "/file")
    assert is_dir is False
    assert contents(data) == {"file": b"F"}


@pytest.mark.parametrize(
    ("src", "include_parent", "prefix"),
    [
        ("/dir", True, "dir"),
        ("/dir", False, "."),
        ("/dir/.", True, "."),
        ("/dir/.", False, "."),
        ("/dir/", True, "dir"),
    ],
)
async def test_download_a_directory(
    server: str, source: Path, src: str, include_parent: bool, prefix: str
) -> None:
    data, is_dir = await download(server, src, include_parent=include_parent)
    assert is_dir is True
    assert names(data) == [prefix, *(f"{prefix}/{n}" for n in ["a", "link", "sub", "sub/b"])]


@pytest.mark.parametrize(
    ("src", "follow", "expected"),
    [
        ("/filelink", False, None),
        ("/filelink", True, {"filelink": b"F"}),
        ("/dirlink", True, {"dirlink/a": b"A", "dirlink/sub/b": b"B"}),
    ],
)
async def test_download_follow_symlinks(
    server: str, source: Path, src: str, follow: bool, expected: dict[str, bytes] | None
) -> None:
    data, _ = await download(server, src, follow_symlinks=follow)
    assert data is not None
    with tarfile.open(fileobj=__import__("io").BytesIO(data)) as tar:
        first = tar.getmembers()[0]
    if expected is None:
        assert (first.name, first.issym(), first.linkname) == ("filelink", True, "/file")
    else:
        assert contents(data) == expected
        # A link inside the tree stays a link, even when following the source.
        if src == "/dirlink":
            assert "dirlink/link" in names(data)


async def test_download_of_a_symlink_not_followed_packs_the_link(server: str, source: Path) -> None:
    data, is_dir = await download(server, "/dirlink", follow_symlinks=False)
    assert is_dir is False
    assert names(data) == ["dirlink"]


async def test_source_is_dir_on_the_first_chunk_only(server: str, root: Path) -> None:
    (root / "big").write_bytes(b"z" * (3 * 1024 * 1024))
    chunks: list[DownloadChunk] = []
    async with open_channel(UnixTarget(server.removeprefix("unix:"))) as channel:
        async with channel.open_call(DOWNLOAD) as call:
            await call.send(DownloadRequest(src_path="/big"), end=True)
            while (chunk := await call.recv()) is not None:
                chunks.append(chunk)
            await call.finish()
    assert len(chunks) > 2
    assert chunks[0].HasField("source_is_dir")
    assert chunks[0].source_is_dir is False
    assert not any(c.HasField("source_is_dir") for c in chunks[1:])

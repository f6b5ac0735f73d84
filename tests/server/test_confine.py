"""Confinement: whatever the existing tree holds, every path resolves inside the root.

Hostile archive entries are in test_rows (HOSTILE); here the
filesystem itself disagrees with the path strings: symlinks already in the
root that point outside it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import boxfiles

from ..helpers.archives import contents, files
from ..helpers.servers import download, upload
from ..helpers.trees import listing


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host directory next to the root that must never be touched."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret").write_text("host secret")
    return path


async def test_absolute_symlink_as_destination_resolves_inside(
    server: str, root: Path, outside: Path
) -> None:
    before = listing(outside)
    (root / "out").symlink_to(outside)  # an absolute host path
    await upload(server, files(f=b"x"), "/out/f", mkdir_parents=True)
    assert listing(outside) == before
    # Inside the root, the link's target is ROOT + that path.
    assert (root / str(outside).lstrip("/") / "f").read_bytes() == b"x"


async def test_absolute_symlink_destination_without_mkdir_parents(
    server: str, root: Path, outside: Path
) -> None:
    before = listing(outside)
    (root / "out").symlink_to(outside)
    with pytest.raises(boxfiles.NotFound, match="no such directory"):
        await upload(server, files(f=b"x"), "/out/f", mkdir_parents=False)
    assert listing(outside) == before


@pytest.mark.parametrize("link", ["../../..", "../outside", "/.."])
async def test_relative_symlink_climbing_out_stops_at_the_root(
    server: str, root: Path, outside: Path, link: str
) -> None:
    before = listing(outside)
    (root / "up").symlink_to(link)
    await upload(server, files(secret=b"overwritten?"), "/up/secret", mkdir_parents=True)
    assert listing(outside) == before
    assert (outside / "secret").read_text() == "host secret"


async def test_symlink_as_the_last_component_of_a_file_destination(
    server: str, root: Path, outside: Path
) -> None:
    (root / "cfg").symlink_to(outside / "secret")
    before = listing(outside)
    await upload(server, files(cfg=b"new"), "/cfg", mkdir_parents=True)
    assert listing(outside) == before
    assert (root / str(outside / "secret").lstrip("/")).read_bytes() == b"new"


async def test_directory_archive_through_outside_symlink(
    server: str, root: Path, outside: Path
) -> None:
    (root / "out").symlink_to(outside)
    before = listing(outside)
    await upload(server, files(**{"a/b": b"1", "secret": b"2"}), "/out", mkdir_parents=True)
    assert listing(outside) == before


async def test_download_through_outside_symlink_reads_inside(
    server: str, root: Path, outside: Path
) -> None:
    (root / "leak").symlink_to(outside / "secret")
    with pytest.raises(boxfiles.NotFound):
        await download(server, "/leak", follow_symlinks=True)
    inside = root / str(outside / "secret").lstrip("/")
    inside.parent.mkdir(parents=True)
    inside.write_text("inside copy")
    data, is_dir = await download(server, "/leak", follow_symlinks=True)
    assert is_dir is False
    assert contents(data) == {"leak": b"inside copy"}


@pytest.mark.parametrize("link", ["../../../../../../etc/hostname", "/etc/hostname"])
async def test_download_via_symlinked_directory_stays_inside(
    server: str, root: Path, link: str
) -> None:
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("box")
    (root / "h").symlink_to(link)
    data, _ = await download(server, "/h", follow_symlinks=True)
    assert contents(data) == {"h": b"box"}
    (root / "d").symlink_to("/etc")
    data, _ = await download(server, "/d/hostname")
    assert contents(data) == {"hostname": b"box"}


async def test_download_of_a_tree_keeps_outside_links_as_links(
    server: str, root: Path, outside: Path
) -> None:
    (root / "t").mkdir()
    (root / "t" / "leak").symlink_to(outside / "secret")
    data, _ = await download(server, "/t", follow_symlinks=True)
    assert contents(data) == {}  # the link, never the host file's content


async def test_symlink_loop_is_refused(server: str, root: Path) -> None:
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    with pytest.raises(boxfiles.InvalidArgument, match="too many levels of symbolic links"):
        await upload(server, files(f=b"x"), "/a/f")
    with pytest.raises(boxfiles.InvalidArgument, match="too many levels of symbolic links"):
        await download(server, "/a", follow_symlinks=True)

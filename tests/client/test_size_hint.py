"""The Download size hint (``boxfiles-size`` initial metadata) as the progress
total, from a grpcio (C-core) server that sends it, good or garbled."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import boxfiles
from boxfiles._aio import open_channel
from boxfiles._proto.files_pb2 import DownloadChunk, DownloadRequest, UploadChunk, UploadResponse
from boxfiles._server._pack import MEASURE_ENTRIES
from boxfiles._target import parse_target
from boxfiles._wire import DOWNLOAD, SIZE_HINT_KEY, size_hint

from ..helpers.grpcio_sink import start_grpcio_server

MiB = 1024 * 1024


def one_file_tar(name: str, data: bytes) -> bytes:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return archive.getvalue()


DATA = os.urandom(3 * MiB + 7)
#: As real peers name it: by the basename asked for (every name here has a
#: one-block header, so every archive is this long).
ARCHIVE = one_file_tar("good", DATA)

#: src_path -> the hint the server sends for it (None: no hint at all).
HINTS: dict[str, str | None] = {
    "/good": str(len(ARCHIVE)),
    "/none": None,
    "/letters": "12ab",
    "/negative": "-5",
    "/float": "3e6",
    "/spaces": " 42",
    "/empty": "",
    "/too-long": "1" * 20,  # over _MAX_SIZE_HINT_DIGITS
}


def download(request: DownloadRequest, context: Any) -> Iterator[DownloadChunk]:
    hint = HINTS[request.src_path]
    if hint is not None:
        context.send_initial_metadata(((SIZE_HINT_KEY, hint),))
    archive = one_file_tar(request.src_path.lstrip("/"), DATA)
    assert len(archive) == len(ARCHIVE)
    for i in range(0, len(archive), MiB):
        chunk = DownloadChunk(data=archive[i : i + MiB])
        if i == 0:
            chunk.source_is_dir = False
        yield chunk


def upload(chunks: Iterator[UploadChunk], context: Any) -> UploadResponse:
    context.abort(grpc.StatusCode.UNIMPLEMENTED, "downloads only")
    raise AssertionError("unreachable")


@pytest.fixture
def hinting_server(sock_dir: Path) -> Iterator[str]:
    server = start_grpcio_server(f"unix:{sock_dir}/hint.sock", upload, download)
    try:
        yield f"unix:{sock_dir}/hint.sock"
    finally:
        server.stop(grace=None).wait()


def recorder(
    seen: dict[str, list[tuple[int, int | None]]], path: str
) -> Callable[[int, int | None], None]:
    reports = seen[path] = []
    return lambda done, total: reports.append((done, total))


async def test_download_tar_reports_the_hinted_total(hinting_server: str, tmp_path: Path) -> None:
    seen: dict[str, list[tuple[int, int | None]]] = {}
    async with boxfiles.open_client(hinting_server) as client:
        for path in HINTS:
            await client.download_tar(path, tmp_path / "a.tar", progress=recorder(seen, path))
            assert (tmp_path / "a.tar").read_bytes() == one_file_tar(path.lstrip("/"), DATA)
    assert seen["/good"][-1] == (len(ARCHIVE), len(ARCHIVE))
    assert {total for _, total in seen["/good"]} == {len(ARCHIVE)}
    for path, reports in seen.items():
        if path != "/good":
            assert reports[-1] == (len(ARCHIVE), None), path
            assert {total for _, total in reports} == {None}, path


async def test_copy_out_reports_the_hinted_total(hinting_server: str, tmp_path: Path) -> None:
    reports: list[tuple[int, int | None]] = []
    async with boxfiles.open_client(hinting_server) as client:
        await client.copy_out(
            "/good", tmp_path / "out.bin", progress=lambda d, t: reports.append((d, t))
        )
    assert reports[-1] == (len(ARCHIVE), len(ARCHIVE))
    assert (tmp_path / "out.bin").stat().st_size == 3 * MiB + 7


def test_non_ascii_digits_are_garbage() -> None:
    # HTTP/2 peers refuse to send these, but a hint is never trusted:
    # str.isdigit() accepts them and int() would fail on "²".
    for text in ("\u00b2", "\u0663\u0664", "4\u00b2"):
        assert size_hint({SIZE_HINT_KEY: text}) is None
    assert size_hint({SIZE_HINT_KEY: "0"}) == 0


async def test_the_reference_server_hints_the_exact_size(
    server: str, root: Path, tmp_path: Path
) -> None:
    (root / "f").write_bytes(os.urandom(MiB + 3))
    tree = root / "d" / "e"
    tree.mkdir(parents=True)
    for i in range(50):
        (tree / (str(i) * (i % 40 + 1))).write_bytes(os.urandom(i * 100))
    os.link(tree / "0", root / "d" / "hard")  # a hard link: a header, no data
    (root / "d" / "link").symlink_to("e/0")
    async with boxfiles.open_client(server) as client:
        seen: dict[str, list[tuple[int, int | None]]] = {}
        for path in ("/f", "/d", "/d/."):
            await client.download_tar(path, tmp_path / "a.tar", progress=recorder(seen, path))
            size = (tmp_path / "a.tar").stat().st_size
            assert seen[path][-1] == (size, size), path


async def test_no_hint_for_a_tree_past_the_measuring_bound(
    server: str, root: Path, tmp_path: Path
) -> None:
    tree = root / "many"
    tree.mkdir()
    for i in range(MEASURE_ENTRIES + 1):
        (tree / str(i)).touch()
    reports: list[tuple[int, int | None]] = []
    async with boxfiles.open_client(server) as client:
        await client.download_tar(
            "/many", tmp_path / "a.tar", progress=lambda d, t: reports.append((d, t))
        )
    assert reports[-1] == ((tmp_path / "a.tar").stat().st_size, None)


@pytest.mark.parametrize("peek", [False, True])
async def test_the_reference_server_sizes_no_archive_for_a_peek(
    server: str, root: Path, peek: bool
) -> None:
    # copy_in's probe of its destination says it will read one message: the
    # server then answers at once, without walking the tree to size it.
    (root / "tree").mkdir()
    (root / "tree" / "f").write_bytes(b"x" * 1000)
    async with open_channel(parse_target(server)) as channel:
        async with channel.open_call(DOWNLOAD, peek=peek) as call:
            await call.send(DownloadRequest(src_path="/tree"), end=True)
            assert await call.recv_pieces() is not None
            hint = size_hint(call.initial_metadata())
            while await call.recv_pieces() is not None:
                pass
            await call.finish()
    assert (hint is None) is peek

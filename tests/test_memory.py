"""Peak memory of an upload is bounded by the chunk size, not the file size."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

import boxfiles

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sink(sock_dir: Path) -> Iterator[str]:
    path = sock_dir / "sink.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.sink", str(path)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield f"unix:{path}"
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()


def make_file(path: Path, size: int) -> Path:
    block = bytes(range(256)) * 4096  # 1 MiB, not all zeros
    with path.open("wb") as f:
        for _ in range(size // MiB):
            f.write(block)
    return path


async def peak_upload(target: str, source: Path, chunk_size: int) -> int:
    tracemalloc.start()
    try:
        async with boxfiles.open_client(target) as client:
            tracemalloc.reset_peak()
            await client.upload_tar(source, "/big", chunk_size=chunk_size)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
async def test_upload_peak_memory_is_bounded_by_chunk_size(sink: str, tmp_path: Path) -> None:
    chunk_size = boxfiles.DEFAULT_CHUNK_SIZE
    # Chunks alive at the worst moment: CHANNEL_CAPACITY queued, one held by
    # the blocked reader plus its reusable buffer, one being sent, and the
    # sender's copies of it on the way down (serialised message, gRPC frame,
    # then HTTP/2 frames and the transport's buffer: a peer that advertises
    # large frames lets h2 copy a whole chunk more than once).
    bound = chunk_size * (boxfiles.CHANNEL_CAPACITY + 10)
    small = await peak_upload(sink, make_file(tmp_path / "s", 16 * MiB), chunk_size)
    big = await peak_upload(sink, make_file(tmp_path / "b", 256 * MiB), chunk_size)
    print(f"peak traced: 16 MiB upload {small / MiB:.1f} MiB, 256 MiB upload {big / MiB:.1f} MiB")
    # One constant bound for both: sixteen times the data, no more memory.
    assert small < bound
    assert big < bound

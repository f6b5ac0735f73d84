"""Property tests: what arrives on the wire for any source and chunk size."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import boxfiles
from boxfiles.testing import FaultServer, ReplyFailure, open_fault_server, short_socket_dir

from ..helpers.archives import BytesReader


@asynccontextmanager
async def recorder() -> AsyncIterator[FaultServer]:
    # Opened per example: hypothesis runs each example in a trio run of its
    # own, which a function-scoped async fixture would outlive.
    with short_socket_dir() as tmp:
        async with open_fault_server(tmp, f"unix:{tmp}/p.sock", keep_data=True) as server:
            yield server


@settings(max_examples=60, deadline=None)
@given(
    length=st.one_of(st.just(0), st.integers(1, 20), st.integers(0, 400_000)),
    chunk_size=st.one_of(st.integers(1, 64), st.integers(1, 300_000)),
    source_is_dir=st.sampled_from([None, True, False]),
    flags=st.tuples(st.booleans(), st.booleans()),
)
async def test_server_receives_exactly_the_source(
    length: int,
    chunk_size: int,
    source_is_dir: bool | None,
    flags: tuple[bool, bool],
) -> None:
    if length // chunk_size > 2000:  # keep each example quick
        chunk_size = length // 2000 + 1
    data = random.Random(length).randbytes(length)
    # success=false: the server reads the whole stream but writes nothing.
    async with recorder() as server, boxfiles.open_client(server.target) as client:
        server.fail_next_upload(ReplyFailure())
        with pytest.raises(boxfiles.UploadRejected):
            await client.upload_tar(
                BytesReader(data),
                "/dest",
                chunk_size=chunk_size,
                source_is_dir=source_is_dir,
                mkdir_parents=flags[0],
                overwrite=flags[1],
            )
    (call,) = server.calls
    assert call.data is not None
    assert bytes(call.data) == data
    expected = [min(chunk_size, length - i) for i in range(0, length, chunk_size)] or [0]
    assert call.sizes == expected  # exactly one (empty) chunk for an empty source
    assert call.client_ended
    first, *rest = call.messages
    assert isinstance(first, boxfiles._proto.files_pb2.UploadChunk)
    assert (first.dest_path, first.mkdir_parents, first.overwrite) == ("/dest", *flags)
    assert first.HasField("source_is_dir") == (source_is_dir is not None)
    if source_is_dir is not None:
        assert first.source_is_dir == source_is_dir
    for chunk in rest:
        assert isinstance(chunk, boxfiles._proto.files_pb2.UploadChunk)
        assert chunk.ListFields() == []  # data only (data was stripped by the recorder)

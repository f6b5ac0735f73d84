"""The hand-rolled framing agrees with protobuf, byte for byte."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from boxfiles._proto.files_pb2 import DownloadChunk, UploadChunk
from boxfiles._wire import (
    DOWNLOAD_DATA_FIELD,
    PREFIX_BYTES,
    Chunk,
    decode_download_chunk,
    decode_upload_chunk,
    encode_metadata_only,
    first_upload_chunk,
)


def unframe(pieces: tuple[bytes | memoryview, ...] | bytes) -> UploadChunk:
    frame = b"".join(pieces) if isinstance(pieces, tuple) else pieces
    assert frame[0] == 0  # not compressed
    assert int.from_bytes(frame[1:5], "big") == len(frame) - 5
    return UploadChunk.FromString(frame[5:])


@given(data=st.binary(max_size=5000), dest=st.text(min_size=1, max_size=300))
def test_framed_chunks_decode_as_protobuf(data: bytes, dest: str) -> None:
    first = first_upload_chunk(dest, "c", mkdir_parents=True, overwrite=False, source_is_dir=True)
    with_meta = unframe(Chunk.of(data).framed(first))
    assert (with_meta.dest_path, with_meta.container_id, with_meta.data) == (dest, "c", data)
    assert with_meta.source_is_dir
    assert (with_meta.mkdir_parents, with_meta.overwrite) == (True, False)
    assert unframe(Chunk.of(data).framed()) == UploadChunk(data=data)


@given(data=st.binary(min_size=1, max_size=5000))
def test_framed_download_chunks_are_protobufs_bytes(data: bytes) -> None:
    frame = b"".join(Chunk.of(data).framed(field=DOWNLOAD_DATA_FIELD))
    assert frame[:PREFIX_BYTES] == b"\x00" + (len(frame) - PREFIX_BYTES).to_bytes(4, "big")
    assert frame[PREFIX_BYTES:] == DownloadChunk(data=data).SerializeToString()


def test_framing_reaches_varint_boundaries() -> None:
    for size in (0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21):
        assert unframe(Chunk.of(b"z" * size).framed()).data == b"z" * size
        download = b"".join(Chunk.of(b"z" * size).framed(field=DOWNLOAD_DATA_FIELD))
        assert DownloadChunk.FromString(download[PREFIX_BYTES:]).data == b"z" * size


def test_metadata_only_chunk() -> None:
    first = first_upload_chunk("/d", "", mkdir_parents=False, overwrite=True, source_is_dir=None)
    decoded = unframe(encode_metadata_only(first))
    assert decoded == first
    assert not decoded.HasField("source_is_dir")


def test_release_returns_the_buffer_once() -> None:
    returned: list[bytearray] = []
    buffer = bytearray(32)
    chunk = Chunk(buffer, 4, returned.append)
    chunk.release()
    chunk.release()
    assert returned == [buffer]


@given(
    data=st.binary(max_size=3000),
    flag=st.sampled_from([None, True, False]),
    cuts=st.lists(st.integers(min_value=0, max_value=3010), max_size=6),
)
def test_download_chunks_decode_like_protobuf(
    data: bytes, flag: bool | None, cuts: list[int]
) -> None:
    """Held in any number of pieces (the frames a message came in), cut
    anywhere, key and length bytes included."""
    message = DownloadChunk(data=data)
    if flag is not None:
        message.source_is_dir = flag
    body = message.SerializeToString()
    bounds = [0, *sorted(min(cut, len(body)) for cut in cuts), len(body)]
    pieces = [body[a:b] for a, b in itertools.pairwise(bounds)]
    got, got_flag = decode_download_chunk(pieces)
    assert (b"".join(got), got_flag) == (data, flag)


def test_unknown_fields_are_skipped() -> None:
    body = (
        DownloadChunk(data=b"abc", source_is_dir=True).SerializeToString()
        + b"\x18\x96\x01"  # field 3, varint
        + b"\x22\x02hi"  # field 4, bytes
        + b"\x2d\x00\x00\x00\x00"  # field 5, fixed32
        + b"\x31"
        + b"\x00" * 8  # field 6, fixed64
    )
    data, flag = decode_download_chunk([body])
    assert (b"".join(data), flag) == (b"abc", True)


@pytest.mark.parametrize(
    "body",
    [b"\x0a\x05abc", b"\x0a", b"\x10", b"\x0b", b"\x2d\x00", b"\x80" * 11],
    ids=["short-bytes", "no-length", "no-varint", "group", "short-fixed32", "long-varint"],
)
def test_malformed_download_chunks_are_refused(body: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- each case has its own reason
        decode_download_chunk([body])


@given(
    data=st.binary(max_size=3000),
    dest=st.text(max_size=300),
    container=st.text(max_size=20),
    flags=st.tuples(st.booleans(), st.booleans(), st.sampled_from([None, True, False])),
    data_first=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=3400), max_size=6),
)
def test_upload_chunks_decode_like_protobuf(
    data: bytes,
    dest: str,
    container: str,
    flags: tuple[bool, bool, bool | None],
    data_first: bool,
    cuts: list[int],
) -> None:
    """Held in any number of pieces, cut anywhere (inside the metadata's
    fields too), with the data before or after the metadata."""
    mkdir_parents, overwrite, source_is_dir = flags
    message = first_upload_chunk(
        dest,
        container,
        mkdir_parents=mkdir_parents,
        overwrite=overwrite,
        source_is_dir=source_is_dir,
    )
    parts = [message.SerializeToString(), UploadChunk(data=data).SerializeToString()]
    body = b"".join(reversed(parts) if data_first else parts)
    bounds = [0, *sorted(min(cut, len(body)) for cut in cuts), len(body)]
    got, got_data = decode_upload_chunk([body[a:b] for a, b in itertools.pairwise(bounds)])
    assert (got, b"".join(got_data)) == (message, data)
    assert got.HasField("source_is_dir") == (source_is_dir is not None)


def test_upload_chunk_fields_in_any_order_and_repeated() -> None:
    body = (
        UploadChunk(data=b"old").SerializeToString()
        + UploadChunk(dest_path="/d", overwrite=True).SerializeToString()
        + UploadChunk(data=b"new").SerializeToString()
        + b"\x40\x01"  # field 8, unknown
    )
    metadata, data = decode_upload_chunk([body[:7], body[7:]])
    assert b"".join(data) == b"new"  # the last occurrence wins, as in protobuf
    assert (metadata.dest_path, metadata.overwrite, metadata.data) == ("/d", True, b"")


@pytest.mark.parametrize(
    "body",
    [b"\x1a\x05abc", b"\x0a\x02\xff\xfe", b"\x00\x01", b"\x0b"],
    ids=["short-data", "dest-not-utf8", "field-zero", "group"],
)
def test_malformed_upload_chunks_are_refused(body: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- each case has its own reason
        decode_upload_chunk([body])

"""The Files service's wire rules, separate from any I/O.

What goes on which chunk, the size limits both sides hold to, and the RPC
descriptors taken from the generated protobuf module (so method paths are
never spelled by hand).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, final

from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from ._proto import files_pb2
from ._proto.files_pb2 import DownloadChunk, DownloadRequest, UploadChunk, UploadResponse

SendT = TypeVar("SendT", bound=Message)
RecvT = TypeVar("RecvT", bound=Message)

MiB = 1024 * 1024

#: Default bytes of file data per message, everywhere a chunk size is not
#: given: upload_tar, copy_in, the server's downloads.
DEFAULT_CHUNK_SIZE = 1 * MiB

#: gRPC peers (grpcio, tonic) refuse messages over 4 MiB by default; keep room
#: for the first chunk's metadata.
MAX_CHUNK_SIZE = 4 * MiB - 64 * 1024

#: Chunks in flight between the reader and the sender (and the receiver and
#: the writer). With one chunk in each task's hands, peak memory is about
#: ``chunk_size * (CHANNEL_CAPACITY + a small constant)``.
CHANNEL_CAPACITY = 4

#: Messages that have arrived whole that a receiver (a download's client,
#: an upload's server) takes in a row without a checkpoint (the rest of a
#: turn's worth of received data waits for the next): bounds the time
#: between checkpoints whatever the messages' size.
ARRIVED_PER_TURN = 64

#: Most buffers one system call takes (IOV_MAX: writev, sendmsg): pieces of
#: messages are written as they are, and may be more.
IOV_MAX = os.sysconf("SC_IOV_MAX")

#: Largest gRPC message either side accepts (gRPC's own default). A message
#: declaring more is refused on its 5-byte prefix, before its body is read,
#: so no more than the stream's flow-control window of it is ever buffered.
MAX_MESSAGE_BYTES = 4 * MiB

#: Longest dest_path / src_path / container_id accepted (bytes, UTF-8).
MAX_PATH_BYTES = 4096


@final
@dataclass(frozen=True)
class Method(Generic[SendT, RecvT]):
    """One RPC of a service: its path, shape and message types."""

    path: str
    client_streaming: bool
    server_streaming: bool
    request_type: type[SendT]
    reply_type: type[RecvT]


def _method(name: str) -> Method:  # type: ignore[type-arg]
    desc = files_pb2.DESCRIPTOR.services_by_name["Files"].methods_by_name[name]
    return Method(
        path=f"/{desc.containing_service.full_name}/{desc.name}",
        client_streaming=desc.client_streaming,
        server_streaming=desc.server_streaming,
        request_type=GetMessageClass(desc.input_type),
        reply_type=GetMessageClass(desc.output_type),
    )


UPLOAD: Method[UploadChunk, UploadResponse] = _method("Upload")
DOWNLOAD: Method[DownloadRequest, DownloadChunk] = _method("Download")


def check_path(value: object, what: str) -> str:
    """Validate a remote path argument; raise TypeError/ValueError naming it."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL: {value!r}")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise ValueError(f"{what} is longer than {MAX_PATH_BYTES} bytes: {value[:64]!r}...")
    return value


def check_container_id(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"container_id must be a str or None, not {type(value).__name__}")
    if "\x00" in value or len(value.encode()) > MAX_PATH_BYTES:
        raise ValueError(f"invalid container_id: {value[:64]!r}")
    return value


#: Initial-metadata key of a Download's archive size in bytes, sent by a
#: server that knows it in advance; only a progress total, never trusted.
SIZE_HINT_KEY = "boxfiles-size"

#: Request-metadata key of a Download the client resets after the first
#: message (copy_in's probe of its destination): a server that would size
#: the archive first (a walk of the whole tree) need not. Other peers
#: ignore it.
PEEK_KEY = "boxfiles-peek"

#: Most digits a size hint may have (2**63 has 19): anything longer is garbage.
_MAX_SIZE_HINT_DIGITS = 19


def size_hint(metadata: Mapping[str, str]) -> int | None:
    """The archive size a server announced, or None when absent or malformed
    (a plain decimal integer is the only accepted form)."""
    text = metadata.get(SIZE_HINT_KEY, "")
    if not (0 < len(text) <= _MAX_SIZE_HINT_DIGITS and text.isascii() and text.isdigit()):
        return None
    return int(text)


def check_chunk_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"chunk_size must be an int, not {type(value).__name__}")
    if not 1 <= value <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE}, got {value}")
    return value


def first_upload_chunk(
    dest_path: str,
    container_id: str,
    *,
    mkdir_parents: bool,
    overwrite: bool,
    source_is_dir: bool | None,
) -> UploadChunk:
    """The metadata every upload starts with; the caller adds its data.

    Both booleans are always set: a real guest reads an absent proto3 bool as
    false and acts on it.
    """
    chunk = UploadChunk(
        dest_path=dest_path,
        container_id=container_id,
        mkdir_parents=bool(mkdir_parents),
        overwrite=bool(overwrite),
    )
    if source_is_dir is not None:
        chunk.source_is_dir = bool(source_is_dir)
    return chunk


#: Bytes kept free in front of a chunk's data for its headers: the 5-byte gRPC
#: message prefix, the protobuf tag of ``data`` and its length (a varint of at
#: most 4 bytes below MAX_CHUNK_SIZE).
HEADER_ROOM = 16

#: Field numbers read by hand, from the generated module (never written out).
UPLOAD_DATA_FIELD = UploadChunk.DESCRIPTOR.fields_by_name["data"].number
DOWNLOAD_DATA_FIELD = DownloadChunk.DESCRIPTOR.fields_by_name["data"].number
_SOURCE_IS_DIR_FIELD = DownloadChunk.DESCRIPTOR.fields_by_name["source_is_dir"].number


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@final
class Chunk:
    """One chunk of upload data, stored after HEADER_ROOM free bytes so that
    it can be framed for the wire in place, without copying the data.

    ``release`` hands the buffer back to whoever lent it, once sent.
    """

    __slots__ = ("_buffer", "_release", "size")

    def __init__(
        self, buffer: bytearray, size: int, release: Callable[[bytearray], None] | None = None
    ) -> None:
        self._buffer = buffer
        self._release = release
        self.size = size

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> Chunk:
        buffer = bytearray(HEADER_ROOM + len(data))
        buffer[HEADER_ROOM:] = data
        return cls(buffer, len(data))

    @property
    def data(self) -> memoryview:
        return memoryview(self._buffer)[HEADER_ROOM : HEADER_ROOM + self.size]

    def framed(
        self, first: UploadChunk | None = None, *, field: int = UPLOAD_DATA_FIELD
    ) -> tuple[bytes | memoryview, ...]:
        """The gRPC message for this chunk: ``first``'s metadata (when given)
        and the data, as an encoded UploadChunk behind its 5-byte prefix (a
        DownloadChunk with ``field=DOWNLOAD_DATA_FIELD``).

        Its pieces are sent back to back; the data is never copied.
        """
        # Wire type 2: length-delimited.
        tag = bytes([field << 3 | 2]) + _varint(self.size)
        if first is not None:
            # Protobuf allows fields in any order: metadata, then the data.
            body = first.SerializeToString() + tag
            return _prefix(len(body) + self.size) + body, self.data
        header = _prefix(len(tag) + self.size) + tag
        start = HEADER_ROOM - len(header)
        self._buffer[start:HEADER_ROOM] = header
        return (memoryview(self._buffer)[start : HEADER_ROOM + self.size],)

    def release(self) -> None:
        if self._release is not None:
            self._release(self._buffer)
            self._release = None


#: Bytes of the prefix in front of every gRPC message: a compressed flag
#: and the body's length.
PREFIX_BYTES = 5


def _prefix(length: int) -> bytes:
    return b"\x00" + length.to_bytes(4, "big")  # uncompressed, then the length


def framed(message: Message) -> tuple[bytes, bytes]:
    """A message as the wire carries it: its prefix, then its body."""
    body = message.SerializeToString()
    return _prefix(len(body)), body


def encode_metadata_only(first: UploadChunk) -> bytes:
    """The gRPC message for an upload with no data at all: one chunk."""
    return b"".join(framed(first))


def decode_download_chunk(
    pieces: Sequence[bytes | memoryview],
) -> tuple[list[memoryview], bool | None]:
    """``(data, source_is_dir)`` of an encoded DownloadChunk held in
    ``pieces`` (the frames it came in): the data as views of them, never
    copied or joined; ``source_is_dir`` is None when the field is absent.

    Unknown fields are skipped, as protobuf requires.

    Raises:
        ValueError: the bytes are not a well-formed message.
    """
    data: list[memoryview] = []
    source_is_dir: bool | None = None
    for field, wire_type, value, _, _ in _Cursor(pieces).fields():
        if field == DOWNLOAD_DATA_FIELD and isinstance(value, list):
            data = value  # the last occurrence wins, as in protobuf
        elif field == _SOURCE_IS_DIR_FIELD and wire_type == 0:
            source_is_dir = value != 0
    return data, source_is_dir


@final
class _Cursor:
    """Reads an encoded message across the pieces it is held in."""

    def __init__(self, pieces: Sequence[bytes | memoryview]) -> None:
        self._pieces = deque(memoryview(piece) for piece in pieces if piece)
        self._size = self.left = sum(len(piece) for piece in self._pieces)

    def fields(self) -> Iterator[tuple[int, int, list[memoryview] | int, int, int]]:
        """``(field, wire type, value, start, end)`` of each field: the value
        is an int (varint), views (length-delimited) or 0 (fixed), and the
        field, key included, spans ``start:end`` of the whole message.

        Raises:
            ValueError: the bytes are not a well-formed message.
        """
        while self.left:
            start = self._size - self.left
            key = self.varint()
            field, wire_type = key >> 3, key & 7
            value: list[memoryview] | int = 0
            if wire_type == 0:
                value = self.varint()
            elif wire_type == 2:
                value = self.take(self.varint())
            elif wire_type in (1, 5):
                self.take(8 if wire_type == 1 else 4)
            else:
                raise ValueError(f"unsupported wire type {wire_type}")
            yield field, wire_type, value, start, self._size - self.left

    def take(self, size: int) -> list[memoryview]:
        """The next ``size`` bytes, as views."""
        if size > self.left:
            raise ValueError("truncated field")
        self.left -= size
        views = []
        while size:
            piece = self._pieces[0]
            if len(piece) > size:
                views.append(piece[:size])
                self._pieces[0] = piece[size:]
                break
            views.append(self._pieces.popleft())
            size -= len(piece)
        return views

    def varint(self) -> int:
        result = shift = 0
        while True:
            if not self.left or shift > 63:
                raise ValueError("truncated or overlong varint")
            piece = self._pieces[0]
            byte = piece[0]
            if len(piece) == 1:
                self._pieces.popleft()
            else:
                self._pieces[0] = piece[1:]
            self.left -= 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7


def decode_upload_chunk(
    pieces: Sequence[bytes | memoryview],
) -> tuple[UploadChunk, list[memoryview]]:
    """``(metadata, data)`` of an encoded UploadChunk held in ``pieces``
    (the frames it came in): the data as views of them, never copied or
    joined (protobuf would copy it into the message, and every read of the
    field copies it again). ``metadata`` is the message with no data.

    Raises:
        ValueError: the bytes are not a well-formed message.
    """
    data: list[memoryview] = []
    spans = []
    for field, _, value, start, end in _Cursor(pieces).fields():
        if field == UPLOAD_DATA_FIELD and isinstance(value, list):
            data = value  # the last occurrence wins, as in protobuf
        else:
            spans.append((start, end))
    if not spans:  # data only, as every message after the first
        return UploadChunk(), data
    try:
        metadata = UploadChunk.FromString(_joined(pieces, spans))
    except DecodeError as err:
        raise ValueError(str(err)) from err
    return metadata, data


def _joined(pieces: Sequence[bytes | memoryview], spans: list[tuple[int, int]]) -> bytes:
    """The bytes at ``spans`` (ascending offsets) of what ``pieces`` hold."""
    out = bytearray()
    offset = 0
    spans_left = deque(spans)
    for piece in pieces:
        end_of_piece = offset + len(piece)
        while spans_left and spans_left[0][0] < end_of_piece:
            start, end = spans_left[0]
            out += memoryview(piece)[max(start - offset, 0) : min(end, end_of_piece) - offset]
            if end > end_of_piece:
                break  # the span goes on in the next piece
            spans_left.popleft()
        offset = end_of_piece
    return bytes(out)

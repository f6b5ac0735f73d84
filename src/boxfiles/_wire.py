"""The Files service's wire rules, separate from any I/O.

What goes on which chunk, the size limits both sides hold to, and the RPC
descriptors taken from the generated protobuf module (so method paths are
never spelled by hand).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
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

_DATA_FIELD = 3
_DATA_TAG = _DATA_FIELD << 3 | 2  # wire type 2: length-delimited


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

    def framed(self, first: UploadChunk | None = None) -> tuple[bytes | memoryview, ...]:
        """The gRPC message for this chunk: ``first``'s metadata (when given)
        and the data, as an encoded UploadChunk behind its 5-byte prefix.

        Its pieces are sent back to back; the data is never copied.
        """
        field = bytes([_DATA_TAG]) + _varint(self.size)
        if first is not None:
            # Protobuf allows fields in any order: metadata, then the data.
            body = first.SerializeToString() + field
            return _prefix(len(body) + self.size) + body, self.data
        header = _prefix(len(field) + self.size) + field
        start = HEADER_ROOM - len(header)
        self._buffer[start:HEADER_ROOM] = header
        return (memoryview(self._buffer)[start : HEADER_ROOM + self.size],)

    def release(self) -> None:
        if self._release is not None:
            self._release(self._buffer)
            self._release = None


def _prefix(length: int) -> bytes:
    return b"\x00" + length.to_bytes(4, "big")  # uncompressed, then the length


def encode_metadata_only(first: UploadChunk) -> bytes:
    """The gRPC message for an upload with no data at all: one chunk."""
    body = first.SerializeToString()
    return _prefix(len(body)) + body


def decode_download_chunk(body: bytes) -> tuple[memoryview, bool | None]:
    """``(data, source_is_dir)`` of an encoded DownloadChunk, without copying
    the data; ``source_is_dir`` is None when the field is absent.

    Unknown fields are skipped, as protobuf requires.

    Raises:
        ValueError: the bytes are not a well-formed message.
    """
    view = memoryview(body)
    data = view[:0]
    source_is_dir: bool | None = None
    for field, wire_type, value, _ in _fields(view):
        if field == 1 and isinstance(value, memoryview):
            data = value  # the last occurrence wins, as in protobuf
        elif field == 2 and wire_type == 0:
            source_is_dir = value != 0
    return data, source_is_dir


def decode_upload_chunk(body: bytes) -> tuple[UploadChunk, memoryview]:
    """``(metadata, data)`` of an encoded UploadChunk, without copying the
    data: protobuf would copy it into the message, and every read of the
    field copies it again. ``metadata`` is the message with no data.

    Raises:
        ValueError: the bytes are not a well-formed message.
    """
    view = memoryview(body)
    data = view[:0]
    rest = []
    for field, _, value, raw in _fields(view):
        if field == _DATA_FIELD and isinstance(value, memoryview):
            data = value  # the last occurrence wins, as in protobuf
        else:
            rest.append(raw)
    try:
        metadata = UploadChunk.FromString(b"".join(rest))
    except DecodeError as err:
        raise ValueError(str(err)) from err
    return metadata, data


def _fields(view: memoryview) -> Iterator[tuple[int, int, memoryview | int, memoryview]]:
    """``(field, wire type, value, raw)`` of each field of an encoded message:
    the value is an int (varint), a view (length-delimited) or 0 (fixed), and
    ``raw`` the whole field, key included.

    Raises:
        ValueError: the bytes are not a well-formed message.
    """
    pos = 0
    while pos < len(view):
        start = pos
        key, pos = _read_varint(view, pos)
        field, wire_type = key >> 3, key & 7
        value: memoryview | int = 0
        if wire_type == 0:
            value, pos = _read_varint(view, pos)
        elif wire_type == 2:
            length, pos = _read_varint(view, pos)
            if pos + length > len(view):
                raise ValueError("truncated length-delimited field")
            value = view[pos : pos + length]
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > len(view):
                raise ValueError("truncated fixed-width field")
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        yield field, wire_type, value, view[start:pos]


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7

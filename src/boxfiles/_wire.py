"""The Files service's wire rules, separate from any I/O.

What goes on which chunk, the size limits both sides hold to, and the RPC
descriptors taken from the generated protobuf module (so method paths are
never spelled by hand).
"""

from __future__ import annotations

from google.protobuf.message_factory import GetMessageClass

from ._bridge import Method
from ._proto import files_pb2
from ._proto.files_pb2 import DownloadChunk, DownloadRequest, UploadChunk, UploadResponse

MiB = 1024 * 1024

#: Default bytes of file data per message.
DEFAULT_CHUNK_SIZE = 1 * MiB

#: gRPC peers (grpcio, tonic) refuse messages over 4 MiB by default; keep room
#: for the first chunk's metadata.
MAX_CHUNK_SIZE = 4 * MiB - 64 * 1024

#: Chunks in flight between the reader and the sender (and the receiver and
#: the writer). With one chunk in each task's hands, peak memory is about
#: ``chunk_size * (CHANNEL_CAPACITY + a small constant)``.
CHANNEL_CAPACITY = 4

#: Longest dest_path / src_path / container_id accepted (bytes, UTF-8).
MAX_PATH_BYTES = 4096


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

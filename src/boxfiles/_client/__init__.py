"""The client: the facade (_client), its calls (_transfer), copy_in
(_copy_in), copy_out (_copy_out) and its placement (_place), local sources
and destinations (_local), and progress (_progress)."""

from ._client import FilesClient, open_client
from ._local import AsyncReader, AsyncWriter, describe_oserror
from ._progress import format_bytes

__all__ = [
    "AsyncReader",
    "AsyncWriter",
    "FilesClient",
    "describe_oserror",
    "format_bytes",
    "open_client",
]

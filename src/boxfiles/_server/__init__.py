"""The reference server: the service (_service), upload staging (_staging),
extraction and placement (_extract), packing (_pack), confinement to a
container root (_confine), and serve_files() (_listen).

The server's own modules raise the statuses a client will see (RemoteError
subclasses): those rules are the server's. Code shared with the client
(_fs, _tar) raises neutral errors (OSError, BadEntry, tarfile.ReadError),
mapped here in one place each: OSError by _service._remote_from_os,
BadEntry by _extract._entry_parts, a read error by _extract.extract.
"""

from ._listen import CONNECTION_IDLE_TIMEOUT, MAX_CONNECTIONS, serve_files, serve_service
from ._service import IDLE_TIMEOUT, MAX_TRANSFERS, FilesService

__all__ = [
    "CONNECTION_IDLE_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_TRANSFERS",
    "FilesService",
    "serve_files",
    "serve_service",
]

"""The reference server: the service (_service), upload staging (_staging),
extraction and placement (_extract), packing (_pack), confinement to a
container root (_confine), and serve_files() (_listen)."""

from ._listen import serve_files, serve_service
from ._service import IDLE_TIMEOUT, MAX_TRANSFERS, FilesService

__all__ = ["IDLE_TIMEOUT", "MAX_TRANSFERS", "FilesService", "serve_files", "serve_service"]

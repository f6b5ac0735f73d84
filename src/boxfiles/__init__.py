"""boxfiles: stream files in and out of sandboxes over the boxlite.v1.Files gRPC service, from trio."""

from ._api import publish
from ._client import AsyncReader as AsyncReader
from ._client import AsyncWriter as AsyncWriter
from ._client import FilesClient as FilesClient
from ._client import open_client as open_client
from ._errors import AlreadyExists as AlreadyExists
from ._errors import DeadlineExceeded as DeadlineExceeded
from ._errors import FailedPrecondition as FailedPrecondition
from ._errors import FilesError as FilesError
from ._errors import IncompleteTransfer as IncompleteTransfer
from ._errors import Internal as Internal
from ._errors import InvalidArgument as InvalidArgument
from ._errors import LocalIOError as LocalIOError
from ._errors import NotFound as NotFound
from ._errors import PermissionDenied as PermissionDenied
from ._errors import RemoteError as RemoteError
from ._errors import ResourceExhausted as ResourceExhausted
from ._errors import Status as Status
from ._errors import Unavailable as Unavailable
from ._errors import UnsafeArchive as UnsafeArchive
from ._errors import UploadRejected as UploadRejected
from ._server import serve_files as serve_files
from ._wire import CHANNEL_CAPACITY as CHANNEL_CAPACITY
from ._wire import DEFAULT_CHUNK_SIZE as DEFAULT_CHUNK_SIZE
from ._wire import MAX_CHUNK_SIZE as MAX_CHUNK_SIZE

__all__ = [
    "CHANNEL_CAPACITY",
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "AlreadyExists",
    "AsyncReader",
    "AsyncWriter",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FilesClient",
    "FilesError",
    "IncompleteTransfer",
    "Internal",
    "InvalidArgument",
    "LocalIOError",
    "NotFound",
    "PermissionDenied",
    "RemoteError",
    "ResourceExhausted",
    "Status",
    "Unavailable",
    "UnsafeArchive",
    "UploadRejected",
    "open_client",
    "serve_files",
]

publish("boxfiles", __all__, globals())
del publish

__version__ = "0.1.0"

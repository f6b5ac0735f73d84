"""Test support: fixtures for your own trio tests, and a server that breaks on purpose.

With boxfiles installed, pytest loads the fixtures ``files_server``,
``files_client`` and ``fault_server`` by itself (a ``pytest11`` entry point).
"""

from .._api import publish
from ._faults import CallRecord as CallRecord
from ._faults import Corrupt as Corrupt
from ._faults import DropConnection as DropConnection
from ._faults import Fault as Fault
from ._faults import FaultServer as FaultServer
from ._faults import Reject as Reject
from ._faults import ReplyFailure as ReplyFailure
from ._faults import Slow as Slow
from ._faults import Stall as Stall
from ._faults import open_fault_server as open_fault_server
from ._plugin import FilesServer as FilesServer
from ._plugin import short_socket_dir as short_socket_dir

__all__ = [
    "CallRecord",
    "Corrupt",
    "DropConnection",
    "Fault",
    "FaultServer",
    "FilesServer",
    "Reject",
    "ReplyFailure",
    "Slow",
    "Stall",
    "open_fault_server",
    "short_socket_dir",
]

publish("boxfiles.testing", __all__, globals())
del publish

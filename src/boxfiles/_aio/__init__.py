"""The asyncio edge: the only package that imports asyncio, grpclib or h2.

grpclib runs on an asyncio loop that lives inside trio (:mod:`._loop`);
everything handed out of this package is trio-flavoured, and every foreign
exception is mapped here onto the boxfiles hierarchy (the original kept as
``__cause__``). Private names of the dependencies are used in
:mod:`._internals` only.
"""

from ._channel import PEEK_WINDOW, STREAM_WINDOW, Channel, ClientCall, open_channel
from ._frames import FRAME_LIMIT, RECEIVE_FRAME_LIMIT, SERVER_RECEIVE_FRAME_LIMIT
from ._loop import UNIX_SEND_BUFFER, TrioEventLoop, current_loop
from ._serve import Handler, ServerCall, serve

__all__ = [
    "FRAME_LIMIT",
    "PEEK_WINDOW",
    "RECEIVE_FRAME_LIMIT",
    "SERVER_RECEIVE_FRAME_LIMIT",
    "STREAM_WINDOW",
    "UNIX_SEND_BUFFER",
    "Channel",
    "ClientCall",
    "Handler",
    "ServerCall",
    "TrioEventLoop",
    "current_loop",
    "open_channel",
    "serve",
]

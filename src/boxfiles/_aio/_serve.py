"""The server side of the edge: trio handlers served by grpclib's server."""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from functools import partial
from typing import Any, Generic, NoReturn, Protocol, TypeVar, final

import grpclib.const
import grpclib.exceptions
import grpclib.server
import h2.errors
import hyperframe.frame
import trio
from google.protobuf.message import DecodeError, Message

from .._errors import FilesError, InvalidArgument, RemoteError, ResourceExhausted
from .._supervise import one_error
from .._wire import Method, framed
from . import _frames, _internals
from ._edge import cardinality, run, run_now
from ._frames import SERVER_RECEIVE_FRAME_LIMIT, MessageTooLarge
from ._listener import ConnectionLimits, Listener
from ._loop import CLEANUP_TIMEOUT, TrioEventLoop, open_loop

log = logging.getLogger("boxfiles")

T = TypeVar("T")
RecvT = TypeVar("RecvT", bound=Message)
SendT = TypeVar("SendT", bound=Message)
RecvT_co = TypeVar("RecvT_co", bound=Message, covariant=True)
SendT_contra = TypeVar("SendT_contra", bound=Message, contravariant=True)

_FROM_CLIENT = "receiving from the client"
_TO_CLIENT = "sending to the client"


class ServerCall(Protocol[RecvT_co, SendT_contra]):
    """The server's side of one RPC, seen from trio.

    A Protocol, so a test rig can wrap a call to inject faults.
    """

    #: The client's address, ``host:port``, or ``"unix"``.
    peer: str

    #: The client's request metadata (text values only).
    metadata: Mapping[str, str]

    async def recv(self) -> RecvT_co | None:
        """The next message, or None once the client ended its side cleanly.

        A client reset does not return: it cancels the handler.
        """
        ...

    async def recv_encoded(self) -> bytes | None:
        """The next message's encoded bytes, as :meth:`recv` but for the
        caller to decode."""
        ...

    async def recv_pieces(self) -> list[memoryview] | None:
        """The next message's encoded bytes as views of the frames they came
        in, as :meth:`recv_encoded` but never joined (for the caller to
        decode without copying its payload)."""
        ...

    def recv_arrived(self) -> list[memoryview] | None:
        """The next message as :meth:`recv_pieces` gives it, if it has
        arrived whole; None otherwise (then ``recv_pieces`` waits for it or
        tells why there is none). Not a checkpoint: a caller that loops on
        it must reach one in bounded time of its own."""
        ...

    async def send(self, message: SendT_contra, /) -> None: ...

    async def send_framed(self, pieces: Sequence[bytes | memoryview], /) -> None:
        """Send one message already encoded as the wire carries it (its
        5-byte prefix, then its body), in ``pieces`` sent back to back:
        :meth:`send` without the encoding's copies. The pieces may be
        reused once this returns."""
        ...

    async def send_initial_metadata(self, metadata: Mapping[str, str], /) -> None:
        """Send the response headers now, with ``metadata`` (ASCII keys and
        values); :meth:`send` sends them bare if this was not called first."""
        ...

    def abort_connection(self) -> None:
        """Drop the whole connection at once (no GOAWAY, no status)."""
        ...


@final
class _GrpclibServerCall(Generic[RecvT, SendT]):
    """A grpclib server stream as a :class:`ServerCall`."""

    def __init__(
        self,
        loop: TrioEventLoop,
        stream: grpclib.server.Stream[RecvT, SendT],
        request_type: type[RecvT],
    ) -> None:
        self._loop = loop
        self._stream = stream
        self._request_type = request_type
        addr = stream.peer.addr() if stream.peer is not None else None
        self.peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unix"
        self.metadata = {k: v for k, v in (stream.metadata or {}).items() if isinstance(v, str)}

    async def recv(self) -> RecvT | None:
        body = await self.recv_encoded()
        if body is None:
            return None
        message = self._request_type()
        try:
            message.ParseFromString(body)
        except DecodeError as err:
            raise InvalidArgument(f"malformed {message.DESCRIPTOR.name}: {err}") from err
        return message

    async def recv_encoded(self) -> bytes | None:
        pieces = await self.recv_pieces()
        return None if pieces is None else b"".join(pieces)

    def recv_arrived(self) -> list[memoryview] | None:
        return self._now(_frames.recv_buffered_from_client)

    async def recv_pieces(self) -> list[memoryview] | None:
        await trio.lowlevel.checkpoint_if_cancelled()
        # Without an asyncio task while the message is only waiting for its
        # data: tried again whenever something arrives for the stream.
        while (pieces := self.recv_arrived()) is None:
            if not self._now(_frames.awaiting_data_from_client):
                try:
                    return await run(
                        self._loop, _frames.recv_pieces_from_client(self._stream), _FROM_CLIENT
                    )
                except FilesError as exc:
                    if isinstance(exc.__cause__, MessageTooLarge):
                        raise ResourceExhausted(str(exc.__cause__)) from exc.__cause__
                    raise
            await _internals.data_arrival(_internals.h2_stream_of(self._stream))
        await trio.lowlevel.cancel_shielded_checkpoint()
        return pieces

    def _now(self, fn: Callable[[grpclib.server.Stream[RecvT, SendT]], T]) -> T:
        return run_now(partial(fn, self._stream), _FROM_CLIENT)

    async def send(self, message: SendT, /) -> None:
        await self.send_framed(framed(message))

    async def send_framed(self, pieces: Sequence[bytes | memoryview], /) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not _internals.reply_headers_pending(self._stream):
            pieces = run_now(partial(_frames.send_now, self._stream, pieces), _TO_CLIENT)
            if not pieces:
                _internals.count_sent_reply(self._stream)
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
        await run(self._loop, _frames.send_reply(self._stream, pieces), _TO_CLIENT)

    async def send_initial_metadata(self, metadata: Mapping[str, str], /) -> None:
        await run(
            self._loop,
            self._stream.send_initial_metadata(metadata=dict(metadata)),
            _TO_CLIENT,
        )

    def abort_connection(self) -> None:
        _internals.abort_connection(self._stream)


#: A trio-flavoured handler: returns normally for OK, raises RemoteError for a
#: status. Any other exception becomes INTERNAL and is logged.
Handler = Callable[[ServerCall[Any, Any]], Awaitable[None]]


def _adapt(
    loop: TrioEventLoop, method: Method[Any, Any], handler: Handler
) -> Callable[[grpclib.server.Stream[Any, Any]], Coroutine[Any, Any, None]]:
    async def handle(stream: grpclib.server.Stream[Any, Any]) -> None:
        try:
            await loop.run_trio(handler, _GrpclibServerCall(loop, stream, method.request_type))
        except RemoteError as exc:
            raise grpclib.exceptions.GRPCError(
                grpclib.const.Status(exc.status.value), exc.message
            ) from None
        except FilesError as exc:
            raise grpclib.exceptions.GRPCError(grpclib.const.Status.INTERNAL, str(exc)) from None
        except Exception:
            log.exception("handler failed")
            raise grpclib.exceptions.GRPCError(
                grpclib.const.Status.INTERNAL, "internal server error"
            ) from None

    return handle


@final
class _Service:
    """grpclib's view of a mapping of trio handlers."""

    def __init__(self, loop: TrioEventLoop, handlers: Mapping[Method[Any, Any], Handler]) -> None:
        self._loop = loop
        self._handlers = handlers

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            method.path: grpclib.const.Handler(
                _adapt(self._loop, method, handler),
                cardinality(method),
                method.request_type,
                method.reply_type,
            )
            for method, handler in self._handlers.items()
        }


def _is_idle(protocol: Any) -> bool:
    return _internals.serves_no_call(protocol)


def _tune(protocol: Any) -> None:
    _internals.announce_frame_size(protocol, SERVER_RECEIVE_FRAME_LIMIT)
    _internals.receive_frames_as_views(protocol)
    _internals.goaway_on_protocol_errors(protocol)


async def _start(handlers: list[_Service], sock: socket.socket) -> grpclib.server.Server:
    # Made on the loop: grpclib's Server takes the running loop as its own.
    server = grpclib.server.Server(handlers)
    await server.start(sock=sock)
    return server


async def _stop(server: grpclib.server.Server) -> None:
    # Handlers are cancelled (their clients see a reset) and waited for;
    # the loop's close then drops every connection still open.
    server.close()
    await server.wait_closed()


def _refusal(max_connections: int) -> bytes:
    # The server's connection preface, then GOAWAY naming no stream: the
    # client learns why, and that nothing it sent was processed.
    goaway = hyperframe.frame.GoAwayFrame(
        0,
        last_stream_id=0,
        error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
        additional_data=f"too many connections (at most {max_connections})".encode(),
    )
    return hyperframe.frame.SettingsFrame(0).serialize() + goaway.serialize()


async def serve(
    sock: socket.socket,
    handlers: Mapping[Method[Any, Any], Handler],
    *,
    max_connections: int,
    connection_idle_timeout: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``handlers`` on the listening socket ``sock`` until cancelled.

    At most ``max_connections`` connections are open at once: one more is
    sent GOAWAY and closed. A connection that receives nothing and runs no
    call for ``connection_idle_timeout`` seconds (to half as long again) is
    closed.

    On cancellation the listener stops, calls in flight are cancelled
    (their clients see a reset), connections are dropped, and this returns
    only once all of that has ended. The socket is owned by the caller.
    """
    with one_error():
        async with open_loop() as loop:
            loop.on_connection = _tune
            limits = ConnectionLimits(
                max_connections=max_connections,
                idle_timeout=connection_idle_timeout,
                is_idle=_is_idle,
                refusal=_refusal(max_connections),
            )
            loop.make_listener = partial(Listener, limits=limits)
            server = await run(
                loop, _start([_Service(loop, handlers)], sock), "starting the server"
            )
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT):
                    await loop.run_asyncio(_stop(server))
    raise AssertionError("unreachable")  # sleep_forever only ends by raising

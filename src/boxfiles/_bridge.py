"""The trio <-> asyncio edge: grpclib driven from trio through trio-asyncio.

This is the only module that imports asyncio, trio_asyncio, grpclib or h2.
Everything it hands out is trio-flavoured, and every foreign exception is
mapped here onto the boxfiles hierarchy (the original kept as ``__cause__``).

Two things the obvious trio-asyncio pattern gets wrong are handled here
deliberately (see SPEC, "Facts about real peers"):

* a status the peer sent is read from the stream before a "stream terminated"
  error is reported, so the status class survives;
* when the trio side fails or is cancelled, the HTTP/2 stream is reset at once
  (RST_STREAM) from a shielded scope, rather than when the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NoReturn, Protocol, TypeVar, final

import grpclib.client
import grpclib.const
import grpclib.exceptions
import grpclib.protocol
import grpclib.server
import h2.connection
import h2.exceptions
import h2.settings
import h2.stream
import hyperframe.frame
import trio
from google.protobuf.message import Message
from grpclib.protocol import H2Protocol

from ._errors import (
    DeadlineExceeded,
    FilesError,
    IncompleteTransfer,
    RemoteError,
    Unavailable,
    remote_error,
)
from ._supervise import one_error
from ._target import Target, UnixTarget

if TYPE_CHECKING:
    # Imported where first needed at run time: importing trio_asyncio
    # replaces asyncio's event loop policy for the whole process, which a
    # program that merely imports boxfiles should not pay for.
    import trio_asyncio

log = logging.getLogger("boxfiles")

SendT = TypeVar("SendT", bound=Message)
RecvT = TypeVar("RecvT", bound=Message)
RecvT_co = TypeVar("RecvT_co", bound=Message, covariant=True)
SendT_contra = TypeVar("SendT_contra", bound=Message, contravariant=True)
T = TypeVar("T")

#: Largest DATA frame sent, and accepted (SETTINGS_MAX_FRAME_SIZE), by this
#: side. HTTP/2's default of 16 KiB makes a 1 MiB message 64 frames, each
#: parsed, flow-controlled and buffered on its own by h2 and grpclib: most of
#: what receiving costs. Much larger frames cost more than they save: h2 and
#: grpclib copy each received frame whole, and a copy over glibc's mmap
#: threshold (128 KiB) faults in fresh pages every time; so does the
#: transport's copy of a sent frame the socket did not take at once.
FRAME_LIMIT = 120 * 1024


def _cheap_data_frame_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


# h2 logs repr(frame) for every frame it receives, at trace level but built
# eagerly, and a DATA frame's repr copies and hex-encodes its whole payload:
# a quarter of a download's CPU. Only that debug text changes.
if "_body_repr" not in hyperframe.frame.DataFrame.__dict__:
    hyperframe.frame.DataFrame._body_repr = _cheap_data_frame_repr  # type: ignore[method-assign, assignment]

#: Unsent bytes the transport may hold before the sender waits (asyncio's
#: default is 64 KiB); low water is a quarter of it.
WRITE_BUFFER_HIGH = 256 * 1024

#: Kernel send buffer asked for on a unix socket (Linux's default is about
#: 208 KiB, less than one chunk). With room for a whole chunk the sender
#: writes straight to the socket instead of waking for every few frames the
#: receiver reads: a third less client CPU against a receiver slower than
#: the sender. The kernel caps it at net.core.wmem_max. TCP sockets keep
#: their autotuning, which a fixed size would switch off.
UNIX_SEND_BUFFER = 1024 * 1024

#: How long a shielded clean-up (stream reset, channel close) may take before
#: it is abandoned; these never wait on the peer, so this is only a backstop.
CLEANUP_TIMEOUT = 5.0


@final
@dataclass(frozen=True)
class Method(Generic[SendT, RecvT]):
    """One RPC of a service: its path, shape and message types."""

    path: str
    client_streaming: bool
    server_streaming: bool
    request_type: type[SendT]
    reply_type: type[RecvT]

    @property
    def _cardinality(self) -> grpclib.const.Cardinality:
        return _CARDINALITY[self.client_streaming, self.server_streaming]


_CARDINALITY = {c.value: c for c in grpclib.const.Cardinality}


@asynccontextmanager
async def _asyncio_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    # Reuse a trio-asyncio loop the caller already runs; otherwise open one
    # that lives exactly as long as this context.
    import trio_asyncio

    loop = trio_asyncio.current_loop.get()
    if loop is not None:
        yield loop
        return
    # open_loop runs the block inside a nursery, which wraps whatever the
    # block raises; hand back the exception itself.
    with one_error():
        async with trio_asyncio.open_loop() as new_loop:
            yield new_loop


def _map_exception(exc: BaseException, where: str) -> FilesError:
    if isinstance(exc, grpclib.exceptions.GRPCError):
        return remote_error(int(exc.status.value), exc.message)
    if isinstance(exc, asyncio.TimeoutError):
        return DeadlineExceeded(f"deadline exceeded {where}")
    if isinstance(exc, grpclib.exceptions.StreamTerminatedError):
        return IncompleteTransfer(f"stream closed {where}: {exc}")
    if isinstance(exc, (ConnectionError, OSError)):
        return Unavailable(f"cannot reach {where}: {exc}")
    if isinstance(exc, (grpclib.exceptions.ProtocolError, h2.exceptions.H2Error)):
        return IncompleteTransfer(f"protocol error {where}: {exc}")
    if isinstance(exc, asyncio.CancelledError):
        return IncompleteTransfer(f"call cancelled by the transport {where}")
    return IncompleteTransfer(f"{type(exc).__name__} {where}: {exc}")


async def _run(loop: trio_asyncio.TrioEventLoop, coro: Coroutine[Any, Any, T], where: str) -> T:
    """Run an asyncio coroutine from trio, mapping its failure to a FilesError."""
    try:
        return await loop.run_aio_coroutine(coro)  # type: ignore[no-any-return]
    except trio.Cancelled:
        raise
    except FilesError:
        raise
    except Exception as exc:  # the edge: every foreign error stops here
        raise _map_exception(exc, where) from exc
    except asyncio.CancelledError as exc:  # a BaseException on 3.8+
        raise _map_exception(exc, where) from exc


@final
class ClientCall(Generic[SendT, RecvT]):
    """One open RPC seen from trio. Made by :meth:`Channel.open_call`."""

    def __init__(
        self,
        loop: trio_asyncio.TrioEventLoop,
        stream: grpclib.client.Stream[SendT, RecvT],
        where: str,
    ) -> None:
        self._loop = loop
        self._stream = stream
        self._where = where

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return await _run(self._loop, coro, self._where)
        except IncompleteTransfer as exc:
            # The stream was torn down; if the peer said why, that wins.
            raise self._status_or(exc) from exc.__cause__

    def _status_or(self, exc: FilesError) -> FilesError:
        try:
            self.raise_for_status()
        except RemoteError as found:
            found.__context__ = exc
            return found
        return exc

    def raise_for_status(self) -> None:
        """Raise the RemoteError for a non-OK status the peer already sent."""
        try:
            self._stream._maybe_raise()
        except grpclib.exceptions.GRPCError as status:
            raise remote_error(int(status.status.value), status.message) from status
        except Exception:  # malformed headers: no status to report
            return

    async def send(self, message: SendT, *, end: bool = False) -> None:
        await self._call(self._stream.send_message(message, end=end))

    async def send_encoded(self, *pieces: bytes | memoryview) -> None:
        """Send messages already encoded for the wire (5-byte gRPC prefix
        included), given as pieces sent back to back, in order; their bytes
        go to the socket without further copies."""
        await self._call(_send_encoded(self._stream, pieces))

    async def end(self) -> None:
        await self._call(self._stream.end())

    async def recv(self) -> RecvT | None:
        """The next message, or None once the peer ended its side cleanly."""
        return await self._call(self._stream.recv_message())

    async def recv_encoded(self) -> bytes | None:
        """The next message's encoded bytes (for the caller to decode without
        copying its payload), or None once the peer ended its side cleanly."""
        return await self._call(_recv_encoded(self._stream))

    async def finish(self) -> None:
        """Wait for the peer's status; raise its RemoteError unless OK."""
        await self._call(self._stream.recv_trailing_metadata())

    def initial_metadata(self) -> Mapping[str, str]:
        """The peer's initial metadata (text entries only): empty until its
        first message (or its status) has been received."""
        received = self._stream.initial_metadata
        if received is None:
            return {}
        return {key: value for key, value in received.items() if isinstance(value, str)}


#: HTTP/2 frame header: 24-bit length (as 16 + 8 bits), type, flags, stream id.
_DATA_FRAME_HEADER = struct.Struct(">HBBBL")
_DATA_FRAME_TYPE = hyperframe.frame.DataFrame.type


def send_data_frame(
    h2_connection: h2.connection.H2Connection, stream_id: int, payload: memoryview
) -> tuple[bytes, memoryview]:
    """One DATA frame as h2's ``send_data`` would make it, without its copies.

    h2 copies a frame's payload five times on the way to the socket (to
    bytes, into the frame, behind its header, into its buffer, out of it);
    at upload rates that is most of the CPU an upload costs. This does h2's
    bookkeeping for the frame (state checks, both flow-control windows) and
    hands back what to write: whatever h2 had queued before it plus the
    frame header, then the payload itself. The caller checks the window and
    the peer's frame size limit first, as h2's ``send_data`` requires.

    Raises:
        h2.exceptions.ProtocolError: the connection or stream cannot send
            data (closed or reset), exactly as ``send_data`` would.
    """
    size = len(payload)
    h2_connection.state_machine.process_input(h2.connection.ConnectionInputs.SEND_DATA)
    h2_stream = h2_connection.streams[stream_id]
    h2_stream.state_machine.process_input(h2.stream.StreamInputs.SEND_DATA)
    h2_stream.outbound_flow_control_window -= size
    h2_connection.outbound_flow_control_window -= size
    header = _DATA_FRAME_HEADER.pack(size >> 8, size & 0xFF, _DATA_FRAME_TYPE, 0, stream_id)
    return h2_connection.data_to_send() + header, payload


async def _send_encoded(
    stream: grpclib.client.Stream[Any, Any], pieces: tuple[bytes | memoryview, ...]
) -> None:
    with stream._wrapper:
        await _send_data(stream._stream, pieces)


async def _send_data(
    h2_stream: grpclib.protocol.Stream, pieces: tuple[bytes | memoryview, ...]
) -> None:
    # grpclib's own send path copies every message three more times (protobuf
    # serialisation, prefix concatenation, a BytesIO read per frame) before
    # h2 copies it five more; this is its loop with memoryview slices, and
    # frames written straight to the transport. The pieces are one byte
    # stream: where a message or piece ends does not matter to the frames.
    connection = h2_stream.connection
    h2_connection = h2_stream._h2_connection
    transport = h2_stream._transport
    stream_id = h2_stream.id
    assert stream_id is not None  # headers went first
    writing = _write_lock(connection)
    views = [view for piece in pieces if (view := memoryview(piece))]
    while views:
        if h2_connection.local_flow_control_window(stream_id) <= 0:
            h2_stream.window_updated.clear()
            await h2_stream.window_updated.wait()
            continue
        # The whole batch goes out in one turn while the window lasts (see
        # _WRITE_LOCKS). A stream out of window gives up its turn, so one
        # its peer is not reading never holds up the others.
        async with writing:
            while views:
                while not connection.write_ready.is_set():
                    await connection.write_ready.wait()
                # Other streams may have used the connection's window meanwhile.
                window = h2_connection.local_flow_control_window(stream_id)
                if window <= 0:
                    break
                view = views[0]
                size = min(window, h2_connection.max_outbound_frame_size, len(view), FRAME_LIMIT)
                for part in send_data_frame(h2_connection, stream_id, view[:size]):
                    transport.write(part)
                h2_stream.data_sent += size
                connection.data_sent += size
                connection.data_send_process()
                if size < len(view):
                    views[0] = view[size:]
                else:
                    del views[0]


#: One lock per connection for the streams writing to it: a transport that
#: drains wakes every waiter at once, and one frame can fill it again, so
#: the senders take turns instead of all waking to find it full. A turn is
#: a whole batch while the stream's window lasts: a hand-over per frame
#: cost 32 concurrent uploads a third more client CPU.
_WRITE_LOCKS: weakref.WeakKeyDictionary[grpclib.protocol.Connection, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _write_lock(connection: grpclib.protocol.Connection) -> asyncio.Lock:
    lock = _WRITE_LOCKS.get(connection)
    if lock is None:
        lock = _WRITE_LOCKS[connection] = asyncio.Lock()
    return lock


async def _send_reply(stream: grpclib.server.Stream[Any, Any], message: Message) -> None:
    # grpclib's server send_message (its bookkeeping included), with the
    # encoded message framed as the client frames its own.
    if not stream._send_initial_metadata_done:
        await stream.send_initial_metadata()
    body = message.SerializeToString()
    await _send_data(stream._stream, (b"\x00" + len(body).to_bytes(4, "big"), body))
    stream._send_message_done = True
    stream._messages_sent += 1
    stream._stream.connection.messages_sent += 1
    stream._stream.connection.last_message_sent = time.monotonic()


async def _recv_encoded(stream: grpclib.client.Stream[Any, Any]) -> bytes | None:
    # grpclib's recv_message without the decode: protobuf would copy the
    # payload into the message, and reading the field copies it again.
    if not stream._recv_initial_metadata_done:
        await stream.recv_initial_metadata()
    with stream._wrapper:
        return await _recv_body(stream._stream)


async def _recv_encoded_from_client(stream: grpclib.server.Stream[Any, Any]) -> bytes | None:
    # grpclib's server recv_message without the decode, its bookkeeping
    # kept (but not its RecvMessage event, which carries a decoded message).
    body = await _recv_body(stream._stream)
    if body is not None:
        stream._messages_received += 1
        stream._stream.connection.messages_received += 1
        stream._stream.connection.last_message_received = time.monotonic()
    return body


async def _recv_body(h2_stream: grpclib.protocol.Stream) -> bytes | None:
    prefix = await h2_stream.recv_data(5)
    if not prefix:
        return None
    if prefix[0]:
        raise grpclib.exceptions.ProtocolError("compressed messages are not supported")
    return await h2_stream.recv_data(int.from_bytes(prefix[1:5], "big"))


@final
class Channel:
    """A grpclib channel owned by trio code. Made by :func:`open_channel`."""

    def __init__(
        self, loop: trio_asyncio.TrioEventLoop, channel: grpclib.client.Channel, where: str
    ) -> None:
        self._loop = loop
        self._channel = channel
        self._where = where

    @asynccontextmanager
    async def open_call(
        self, method: Method[SendT, RecvT], *, grpc_timeout: float | None = None
    ) -> AsyncIterator[ClientCall[SendT, RecvT]]:
        """Open one RPC; leaving the block with an exception resets it.

        ``grpc_timeout`` is sent to the peer as ``grpc-timeout``; enforcing
        it locally is the caller's job (a trio deadline).

        On a clean exit the caller must already have read the final status
        (:meth:`ClientCall.finish`). On any exception, trio.Cancelled
        included, RST_STREAM is sent before the exception propagates.
        """
        stream: grpclib.client.Stream[SendT, RecvT] = self._channel.request(
            method.path,
            method._cardinality,
            method.request_type,
            method.reply_type,
            timeout=grpc_timeout,
        )
        await _run(self._loop, stream.__aenter__(), self._where)
        try:
            await _run(self._loop, _send_request(stream), self._where)
            yield ClientCall(self._loop, stream, self._where)
        except BaseException as exc:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLEANUP_TIMEOUT
                try:
                    await self._loop.run_aio_coroutine(_reset(stream, exc))
                except Exception as cleanup:  # already failing: keep the first error
                    log.debug("reset after %r failed: %r", exc, cleanup)
            raise
        else:
            await _run(self._loop, stream.__aexit__(None, None, None), self._where)


async def _send_request(stream: grpclib.client.Stream[Any, Any]) -> None:
    await stream.send_request()
    # asyncio pauses a writer at 64 KiB of unsent data, which a single frame
    # exceeds: every frame would wait for a pause/resume round trip through
    # the event loop.
    stream._stream._transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)


async def _reset(stream: grpclib.client.Stream[Any, Any], exc: BaseException) -> None:
    # grpclib's own exit resets with reset_nowait(), which leaves RST_STREAM
    # in h2's buffer while the socket is backed up (mid-upload, typically):
    # the peer would hear of it only when something else is written. Wait
    # for the socket to take it instead.
    if stream._send_request_done and stream._stream.closable:
        await stream._stream.reset()
    await stream.__aexit__(type(exc), exc, exc.__traceback__)


@final
class _H2Protocol(H2Protocol):
    """grpclib's HTTP/2 protocol, accepting frames up to FRAME_LIMIT and
    sending through a unix socket's buffer of UNIX_SEND_BUFFER."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)
        h2_connection = self.connection._connection
        h2_connection.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: FRAME_LIMIT})
        # Accept larger frames now rather than at the peer's ACK: h2 applies
        # a new limit only from its next receive_data call on, so a large
        # frame read together with the ACK would be refused as too long.
        h2_connection.max_inbound_frame_size = FRAME_LIMIT
        self.connection.flush()


@final
class _ClientChannel(grpclib.client.Channel):
    def _protocol_factory(self) -> H2Protocol:
        return _H2Protocol(grpclib.client.Handler(), self._config, self._h2_config)


async def _new_channel(target: Target) -> grpclib.client.Channel:
    if isinstance(target, UnixTarget):
        channel = _ClientChannel(path=target.path)
        # Peers behind a unix socket (tonic/hyper) reset calls whose
        # :authority is not a plain host name.
        channel._authority = "localhost"
        return channel
    return _ClientChannel(target.host, target.port)


async def _close_channel(channel: grpclib.client.Channel) -> None:
    protocol = channel._protocol
    if protocol is not None and not protocol.connection.is_closing():
        # abort, not close: close() waits for unsent data to drain, and a
        # peer that stopped reading would keep the socket open forever.
        protocol.connection._transport.abort()
    channel.close()
    # Let the transport's connection_lost callback run, so the socket is
    # closed when the caller's block ends rather than some time later.
    await asyncio.sleep(0)


@asynccontextmanager
async def open_channel(target: Target) -> AsyncIterator[Channel]:
    """A channel to ``target`` that connects lazily and closes on exit."""
    async with _asyncio_loop() as loop:
        channel = await _run(loop, _new_channel(target), str(target))
        try:
            yield Channel(loop, channel, str(target))
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLEANUP_TIMEOUT
                await loop.run_aio_coroutine(_close_channel(channel))


class ServerCall(Protocol[RecvT_co, SendT_contra]):
    """The server's side of one RPC, seen from trio.

    A Protocol, so a test rig can wrap a call to inject faults.
    """

    #: The client's address, ``host:port``, or ``"unix"``.
    peer: str

    async def recv(self) -> RecvT_co | None:
        """The next message, or None once the client ended its side cleanly.

        A client reset does not return: it cancels the handler.
        """
        ...

    async def recv_encoded(self) -> bytes | None:
        """The next message's encoded bytes, as :meth:`recv` but for the
        caller to decode (without copying its payload)."""
        ...

    async def send(self, message: SendT_contra, /) -> None: ...

    def abort_connection(self) -> None:
        """Drop the whole connection at once (no GOAWAY, no status)."""
        ...


@final
class _GrpclibServerCall(Generic[RecvT, SendT]):
    """A grpclib server stream as a :class:`ServerCall`."""

    def __init__(
        self, loop: trio_asyncio.TrioEventLoop, stream: grpclib.server.Stream[RecvT, SendT]
    ) -> None:
        self._loop = loop
        self._stream = stream
        addr = stream.peer.addr() if stream.peer is not None else None
        self.peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unix"

    async def recv(self) -> RecvT | None:
        return await _run(self._loop, self._stream.recv_message(), "receiving from the client")

    async def recv_encoded(self) -> bytes | None:
        return await _run(
            self._loop, _recv_encoded_from_client(self._stream), "receiving from the client"
        )

    async def send(self, message: SendT, /) -> None:
        await _run(self._loop, _send_reply(self._stream, message), "sending to the client")

    def abort_connection(self) -> None:
        self._stream._stream.connection._transport.abort()


#: A trio-flavoured handler: returns normally for OK, raises RemoteError for a
#: status. Any other exception becomes INTERNAL and is logged.
Handler = Callable[[ServerCall[Any, Any]], Awaitable[None]]


@final
class _Service:
    """grpclib's view of a mapping of trio handlers."""

    def __init__(
        self, loop: trio_asyncio.TrioEventLoop, handlers: Mapping[Method[Any, Any], Handler]
    ) -> None:
        self._loop = loop
        self._handlers = handlers

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            method.path: grpclib.const.Handler(
                self._adapt(handler),
                method._cardinality,
                method.request_type,
                method.reply_type,
            )
            for method, handler in self._handlers.items()
        }

    def _adapt(
        self, handler: Handler
    ) -> Callable[[grpclib.server.Stream[Any, Any]], Coroutine[Any, Any, None]]:
        loop = self._loop

        async def run(stream: grpclib.server.Stream[Any, Any]) -> None:
            try:
                await loop.trio_as_future(handler, _GrpclibServerCall(loop, stream))
            except RemoteError as exc:
                raise grpclib.exceptions.GRPCError(
                    grpclib.const.Status(exc.status.value), exc.message
                ) from None
            except FilesError as exc:
                raise grpclib.exceptions.GRPCError(
                    grpclib.const.Status.INTERNAL, str(exc)
                ) from None
            except grpclib.exceptions.GRPCError:
                raise
            except Exception:
                log.exception("handler failed")
                raise grpclib.exceptions.GRPCError(
                    grpclib.const.Status.INTERNAL, "internal server error"
                ) from None

        return run


@final
class _Server(grpclib.server.Server):
    """grpclib's server, but one that can drop its open connections.

    grpclib's close() stops listening and cancels handlers but leaves client
    connections open; a structured shutdown must not leave them behind.
    """

    def __init__(self, handlers: list[_Service]) -> None:
        super().__init__(handlers)
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        # grpclib's own factory, with the protocol that announces larger frames.
        self.__gc_step__()
        handler = grpclib.server.Handler(
            self._mapping, self._codec, self._status_details_codec, self.__dispatch__
        )
        self._handlers.add(handler)
        protocol = _H2Protocol(handler, self._config, self._h2_config)
        self._protocols.add(protocol)
        return protocol

    async def shut_down(self) -> None:
        self.close()
        for protocol in list(self._protocols):
            if hasattr(protocol, "processor"):
                protocol.processor.close("server shutting down")
        await self.wait_closed()
        await asyncio.sleep(0)  # let the transports' connection_lost run


async def serve(
    sock: socket.socket,
    handlers: Mapping[Method[Any, Any], Handler],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``handlers`` on the listening socket ``sock`` until cancelled.

    On cancellation the listener is closed, calls in flight are cancelled
    (their clients see a reset) and this returns only once they have ended.
    The socket is owned by the caller.
    """
    async with _asyncio_loop() as loop:
        server = _Server([_Service(loop, handlers)])
        await _run(loop, server.start(sock=sock), "starting the server")
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLEANUP_TIMEOUT
                await loop.run_aio_coroutine(server.shut_down())

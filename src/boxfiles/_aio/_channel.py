"""The client side of the edge: a grpclib channel and its calls, seen from trio.

Two things the obvious pattern gets wrong are handled here deliberately
(docs/contract.md, "What real peers do"):

* a status the peer sent is read from the stream before a "stream
  terminated" error is reported, so the status class survives;
* when the trio side fails or is cancelled, the HTTP/2 stream is reset at
  once with RST_STREAM(CANCEL), from a shielded scope, rather than when the
  connection closes.

And a response the server completed before resetting the stream with
NO_ERROR is kept (RFC 9113 §8.1): sends then end quietly, and the response
and status are read as usual.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Generic, TypeVar, final

import grpclib.client
import grpclib.config
import h2.errors
import trio
from google.protobuf.message import Message

from .._errors import FilesError, IncompleteTransfer, RemoteError, Unavailable, remote_error
from .._supervise import one_error
from .._target import Target, UnixTarget
from .._wire import PEEK_KEY, Method
from . import _frames, _internals
from ._edge import cardinality, run, run_now
from ._frames import RECEIVE_FRAME_LIMIT, FinishedEarly
from ._loop import CLEANUP_TIMEOUT, TrioEventLoop, open_loop

log = logging.getLogger("boxfiles")

#: Receive window of each call's stream (HTTP/2 flow control: how far the
#: server may send ahead of what the client has read). grpclib's default,
#: measured right (docs/contract.md, "Frames and windows").
STREAM_WINDOW = 4 * 1024 * 1024

#: Receive window of a peek (:meth:`Channel.open_call`), never widened: the
#: server gets at most this far past the first message before the reset.
#: HTTP/2's own initial window, which every stream opens with: a stream's
#: window can be widened on its own but not narrowed, so the other calls
#: widen theirs to STREAM_WINDOW as they open.
PEEK_WINDOW = 65_535

SendT = TypeVar("SendT", bound=Message)
RecvT = TypeVar("RecvT", bound=Message)
T = TypeVar("T")


@final
class ClientCall(Generic[SendT, RecvT]):
    """One open RPC seen from trio. Made by :meth:`Channel.open_call`.

    Every method raises a FilesError on failure: the peer's status
    (RemoteError) where it sent one, else IncompleteTransfer, Unavailable
    or DeadlineExceeded. Cancellation propagates as trio.Cancelled.
    """

    def __init__(
        self,
        loop: TrioEventLoop,
        stream: grpclib.client.Stream[SendT, RecvT],
        reply_type: type[RecvT],
        where: str,
    ) -> None:
        self._loop = loop
        self._stream = stream
        self._reply_type = reply_type
        self._where = where
        self._request_ended = False
        #: The peer's complete, OK answer came before the request was ended.
        self.answered_early = False

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return await run(self._loop, coro, self._where)
        except IncompleteTransfer as exc:
            # The stream was torn down; if the peer said why, that wins.
            raise self._status_or(exc) from exc.__cause__

    def _now(self, fn: Callable[[], T]) -> T:
        """_call for a fast path that never waits."""
        try:
            return run_now(fn, self._where)
        except IncompleteTransfer as exc:
            raise self._status_or(exc) from exc.__cause__

    def _status_or(self, exc: FilesError) -> FilesError:
        try:
            self.raise_for_status()
        except RemoteError as found:
            found.__context__ = exc
            return found
        refused = _internals.refused_by_goaway(_internals.h2_stream_of(self._stream))
        if refused is not None:
            # Nothing of the call was processed: the server is there but
            # will not take it now, as gRPC reports a refused stream.
            unavailable = Unavailable(f"the server refused the call {self._where}: {refused}")
            unavailable.__context__ = exc
            return unavailable
        return exc

    def raise_for_status(self) -> None:
        """Raise the RemoteError for a non-OK status the peer already sent."""
        status = _internals.status_received(self._stream)
        if status is not None:
            raise remote_error(int(status.status.value), status.message) from status

    @property
    def finished_early(self) -> bool:
        """The peer completed its response before the request was complete
        (and reset the stream): whatever is left to send is not wanted."""
        return _internals.finished_early(_internals.h2_stream_of(self._stream))

    async def send(self, message: SendT, *, end: bool = False) -> None:
        await self._call(self._stream.send_message(message, end=end))
        self._request_ended = end

    async def send_encoded(self, *pieces: bytes | memoryview) -> None:
        """Send messages already encoded for the wire (5-byte gRPC prefix
        included), given as pieces sent back to back, in order; their bytes
        go to the socket without further copies. Once the peer has
        :attr:`finished_early`, this returns without sending."""
        await trio.lowlevel.checkpoint_if_cancelled()
        rest = self._now(partial(_frames.send_now, self._stream, pieces))
        if not rest:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        try:
            await self._call(_frames.send_encoded(self._stream, rest))
        except IncompleteTransfer as exc:
            if not isinstance(exc.__cause__, FinishedEarly):
                raise

    async def end(self) -> None:
        """End the request (END_STREAM); a no-op once :attr:`finished_early`."""
        if not self.finished_early:
            await self._call(self._stream.end())
        self._request_ended = True

    async def recv(self) -> RecvT | None:
        """The next message, or None once the peer ended its side cleanly."""
        body = await self.recv_encoded()
        if body is None:
            return None
        message = self._reply_type()
        try:
            message.ParseFromString(body)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise IncompleteTransfer(f"malformed message {self._where}: {exc}") from exc
        return message

    def recv_arrived(self) -> list[memoryview] | None:
        """The next message as :meth:`recv_pieces` gives it, if it has
        arrived whole; None otherwise (then ``recv_pieces`` waits for it or
        tells why there is none). Not a checkpoint: a caller that loops on
        it must reach one in bounded time of its own.

        Raises:
            FilesError: as recv_pieces, for a failure already known.
        """
        return self._now(partial(_frames.recv_buffered, self._stream))

    async def recv_pieces(self) -> list[memoryview] | None:
        """The next message, encoded, as views of the frames it came in (for
        the caller to decode without copying its payload), or None once the
        peer ended its side cleanly."""
        await trio.lowlevel.checkpoint_if_cancelled()
        # Without an asyncio task while the message is only waiting for its
        # data: tried again whenever something arrives for the stream.
        while (pieces := self.recv_arrived()) is None:
            if not self._now(partial(_frames.awaiting_data, self._stream)):
                return await self._call(_frames.recv_pieces(self._stream))
            await _internals.data_arrival(_internals.h2_stream_of(self._stream))
        await trio.lowlevel.cancel_shielded_checkpoint()
        return pieces

    async def recv_encoded(self) -> bytes | None:
        """The next message's encoded bytes, or None once the peer ended its
        side cleanly."""
        pieces = await self.recv_pieces()
        return None if pieces is None else b"".join(pieces)

    def initial_metadata(self) -> Mapping[str, str]:
        """The peer's initial metadata (empty until the first message or
        status has been received)."""
        received = self._stream.initial_metadata
        if received is None:
            return {}
        return {key: value for key, value in received.items() if isinstance(value, str)}

    async def finish(self) -> None:
        """Wait for the peer's status; raise its RemoteError unless OK.

        The peer may answer in full before the request is complete (RFC 9113
        §8.1); its status then counts, and :attr:`answered_early` is set:
        the request need not be sent on.
        """
        if self._request_ended:
            await self._call(self._stream.recv_trailing_metadata())
            return
        # grpclib reads a status only once the request has ended.
        await self._call(_frames.recv_trailers(self._stream))
        self.raise_for_status()
        self.answered_early = True


@final
class Channel:
    """A grpclib channel owned by trio code. Made by :func:`open_channel`."""

    def __init__(self, loop: TrioEventLoop, channel: grpclib.client.Channel, where: str) -> None:
        self._loop = loop
        self._channel = channel
        self._where = where

    @asynccontextmanager
    async def open_call(
        self,
        method: Method[SendT, RecvT],
        *,
        grpc_timeout: float | None = None,
        peek: bool = False,
    ) -> AsyncIterator[ClientCall[SendT, RecvT]]:
        """Open one RPC; leaving the block with an exception resets it.

        ``grpc_timeout`` is sent to the peer as ``grpc-timeout``; enforcing
        it locally is the caller's job (a trio deadline). ``peek`` is for a
        call that reads a message or so and resets: its receive window stays
        at PEEK_WINDOW instead of STREAM_WINDOW, and the request says so
        (PEEK_KEY), so a server need not size a response nobody will read.

        On a clean exit the caller must already have read the final status
        (:meth:`ClientCall.finish`). On any exception, trio.Cancelled
        included, RST_STREAM(CANCEL) is sent before the exception propagates.
        """
        stream: grpclib.client.Stream[SendT, RecvT] = self._channel.request(
            method.path,
            cardinality(method),
            method.request_type,
            method.reply_type,
            timeout=grpc_timeout,
            metadata={PEEK_KEY: "1"} if peek else None,
        )
        await run(self._loop, stream.__aenter__(), self._where)
        sent = False
        try:
            await run(self._loop, _send_request(stream, peek), self._where)
            sent = True
            call = ClientCall(self._loop, stream, method.reply_type, self._where)
            yield call
        except BaseException as exc:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT):
                try:
                    await self._loop.run_asyncio(_reset(stream, exc, sent))
                except Exception as cleanup:  # already failing: keep the first error
                    log.debug("reset after %r failed: %r", exc, cleanup)
            raise
        else:
            if call.answered_early:
                # Closed as a call abandoned midway (RST_STREAM if still
                # open, no wait for a status already read).
                early = FinishedEarly()
                await run(self._loop, stream.__aexit__(FinishedEarly, early, None), self._where)
            else:
                await run(self._loop, stream.__aexit__(None, None, None), self._where)


async def _send_request(stream: grpclib.client.Stream[Any, Any], peek: bool) -> None:
    await stream.send_request()
    # In the same step as the HEADERS went out: nothing the peer sent can
    # have closed the stream yet.
    if not peek:
        _internals.widen_receive_window(stream, STREAM_WINDOW - PEEK_WINDOW)


async def _reset(
    stream: grpclib.client.Stream[Any, Any], exc: BaseException, request_sent: bool
) -> None:
    # grpclib's own exit resets with reset_nowait(NO_ERROR), which leaves
    # RST_STREAM in h2's buffer while the socket is backed up (mid-upload,
    # typically): the peer would hear of it only when something else is
    # written. Wait for the socket to take it instead, and say CANCEL, as
    # grpcio and grpc-js clients do.
    if request_sent:
        h2_stream = _internals.h2_stream_of(stream)
        if h2_stream.closable:
            await h2_stream.reset(h2.errors.ErrorCodes.CANCEL)
    await stream.__aexit__(type(exc), exc, exc.__traceback__)


def _tune(protocol: Any) -> None:
    _internals.announce_frame_size(protocol, RECEIVE_FRAME_LIMIT)
    _internals.receive_frames_as_views(protocol)
    _internals.goaway_on_protocol_errors(protocol)
    _internals.keep_complete_responses(protocol)
    _internals.remember_goaway(protocol)


async def _new_channel(target: Target) -> grpclib.client.Channel:
    # Made on the loop: grpclib's Channel takes the running loop as its own.
    # Every stream opens with PEEK_WINDOW; the connection's window stays
    # grpclib's 4 MiB.
    config = grpclib.config.Configuration(http2_stream_window_size=PEEK_WINDOW)
    if isinstance(target, UnixTarget):
        channel = grpclib.client.Channel(path=target.path, config=config)
        _internals.set_authority(channel, "localhost")
        return channel
    return grpclib.client.Channel(target.host, target.port, config=config)


async def _close_channel(channel: grpclib.client.Channel) -> None:
    channel.close()


@asynccontextmanager
async def open_channel(target: Target) -> AsyncIterator[Channel]:
    """A channel to ``target`` that connects lazily and closes on exit.

    Leaving the block, by any exit, closes the connection at once (calls
    still open are reset by their own blocks first); no task outlives it.
    """
    with one_error():
        async with open_loop() as loop:
            loop.on_connection = _tune
            channel = await run(loop, _new_channel(target), str(target))
            try:
                yield Channel(loop, channel, str(target))
            finally:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT):
                    await loop.run_asyncio(_close_channel(channel))

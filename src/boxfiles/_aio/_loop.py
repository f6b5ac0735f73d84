"""An asyncio event loop that lives inside trio: every callback runs in the
trio thread, and every socket is waited on by trio.

grpclib is written for asyncio. Rather than a second event loop (in a thread,
or trio-asyncio's replacement of asyncio's event-loop policy), grpclib runs
on :class:`TrioEventLoop`: a minimal :class:`asyncio.AbstractEventLoop` that
provides what grpclib and asyncio's own Future, Task, Event, Lock and Queue
use (``call_soon``, timers, futures and tasks, connections over
non-blocking sockets, and a listener a server provides: :mod:`._listener`)
and nothing else. Its ready queue is run by a
trio task, and inline by whichever trio task is waiting for asyncio, so a
call that needs no I/O costs no task switch at all.

Only public asyncio API is used, but for marking the loop as running while
its callbacks run; that one reach-in lives in :mod:`._internals`.

Structured: a loop exists only inside :func:`open_loop`; on exit every
asyncio task still pending is cancelled and waited for, every connection is
aborted, and every trio task the loop started has ended.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import logging
import math
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar, final

import trio

from .._wire import IOV_MAX
from ._internals import running_loop

log = logging.getLogger("boxfiles")

T = TypeVar("T")

#: Bytes asked of the kernel per receive (asyncio's selector loop uses the same).
READ_SIZE = 256 * 1024

#: Unsent bytes a transport may hold before it asks its protocol to pause
#: (asyncio's default is 64 KiB, less than one HTTP/2 frame of ours, which
#: would make every frame wait for a pause/resume round trip). The protocol
#: resumes at a quarter of it.
WRITE_BUFFER_HIGH = 256 * 1024

#: Unsent bytes past which a connection is dropped. Senders stop at
#: WRITE_BUFFER_HIGH (over it by one frame at most); only replies HTTP/2
#: makes unasked (PING and SETTINGS acks, window updates), to a peer that
#: sends frames and reads none of ours, could grow the buffer further.
MAX_UNSENT = 16 * WRITE_BUFFER_HIGH

#: Kernel send buffer asked for on a unix socket (Linux's default is about
#: 208 KiB, less than one chunk). With room for a whole chunk the sender
#: writes straight to the socket instead of waking for every few frames the
#: receiver reads: a third less client CPU against a receiver slower than
#: the sender. The kernel caps it at net.core.wmem_max. TCP sockets keep
#: their autotuning, which a fixed size would switch off.
UNIX_SEND_BUFFER = 1024 * 1024

#: How long a shielded clean-up (cancelled asyncio tasks finishing, channel
#: close) may take before it is abandoned; none of them waits on a peer, so
#: this is only a backstop against a coroutine that ignores cancellation.
CLEANUP_TIMEOUT = 5.0

#: Callbacks run per turn of the driver before it lets other trio tasks run.
_BATCH = 1024

MakeListener = Callable[
    ["TrioEventLoop", socket.socket, Callable[[], asyncio.BaseProtocol]], asyncio.AbstractServer
]

_Entry = tuple[asyncio.Handle, Callable[..., object], tuple[Any, ...], contextvars.Context]


@final
class _Timer(asyncio.TimerHandle):
    """A TimerHandle that lets go of its callback when cancelled.

    A cancelled timer waits in the heap until it is due, perhaps hours away
    (grpclib sets one per call with a deadline); what its callback reaches
    (a call's error, its traceback, its frames, their buffers) must not
    wait with it.
    """

    __slots__ = ("entry",)

    entry: list[Any] | None  # callback, args, context

    def cancel(self) -> None:
        super().cancel()
        self.entry = None


@final
class TrioEventLoop(asyncio.AbstractEventLoop):  # type: ignore[misc]
    """The asyncio loop grpclib runs on. Made by :func:`open_loop`.

    Methods that asyncio defines and grpclib never calls raise
    NotImplementedError (the base class's behaviour; typeshed calls them
    abstract, hence the type-check exemptions for this class).
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._ready: deque[_Entry] = deque()
        self._timers: list[tuple[float, int, _Timer]] = []
        self._cancelled_timers = 0
        self._sequence = itertools.count()
        self._parked: trio.lowlevel.Task | None = None
        self._transports: set[SocketTransport] = set()
        self._scopes: set[trio.CancelScope] = set()
        self._ended = False
        self._closed = False
        #: Called with each new protocol once its connection is made (the
        #: bridge tunes HTTP/2 settings there).
        self.on_connection: Callable[[asyncio.BaseProtocol], None] | None = None
        #: Makes (and starts) the listener of create_server; set by a server.
        self.make_listener: MakeListener | None = None

    # -- running callbacks ---------------------------------------------------

    def _schedule(self, entry: _Entry) -> None:
        self._ready.append(entry)
        if self._parked is not None:
            task, self._parked = self._parked, None
            trio.lowlevel.reschedule(task)

    def run_ready(self) -> None:
        """Run the callbacks that are due, as the loop's running turn."""
        now = self.time()
        timers = self._timers
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            if timer.entry is None:
                self._cancelled_timers = max(0, self._cancelled_timers - 1)
            else:
                self._ready.append((timer, *timer.entry))
        if not self._ready:
            return
        with running_loop(self):
            for _ in range(min(len(self._ready), _BATCH)):
                handle, callback, args, context = self._ready.popleft()
                if handle.cancelled():
                    continue
                try:
                    context.run(callback, *args)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self.call_exception_handler(
                        {"message": f"exception in callback {callback!r}", "exception": exc}
                    )

    def _abort_park(self, _: Any) -> trio.lowlevel.Abort:
        self._parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _drive(self) -> None:
        while True:
            self.run_ready()
            if self._ready:
                await trio.lowlevel.checkpoint()
                continue
            deadline = self._timers[0][0] if self._timers else math.inf
            # Parked until a callback is scheduled or the next timer is due.
            with trio.CancelScope(deadline=deadline):
                self._parked = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort_park)

    # -- asyncio's scheduling API --------------------------------------------

    def call_soon(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        context = contextvars.copy_context() if context is None else context
        handle = asyncio.Handle(callback, args, self, context)
        self._schedule((handle, callback, args, context))
        return handle

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        context = contextvars.copy_context() if context is None else context
        handle = _Timer(when, callback, args, self, context)
        handle.entry = [callback, args, context]
        heapq.heappush(self._timers, (when, next(self._sequence), handle))
        if self._parked is not None:  # it may now have an earlier deadline
            task, self._parked = self._parked, None
            trio.lowlevel.reschedule(task)
        return handle

    def call_later(  # type: ignore[override]
        self,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        return self.call_at(self.time() + delay, callback, *args, context=context)

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        # Called by TimerHandle.cancel(). A cancelled entry is skipped when
        # due; but every call with a deadline leaves one behind, due perhaps
        # hours later, so once they are most of the heap it is rebuilt
        # without them (as asyncio's own loop does).
        self._cancelled_timers += 1
        if self._cancelled_timers > _BATCH and self._cancelled_timers * 2 > len(self._timers):
            self._timers = [t for t in self._timers if t[2].entry is not None]
            heapq.heapify(self._timers)
            self._cancelled_timers = 0

    def time(self) -> float:
        return trio.current_time()

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(  # type: ignore[override]
        self,
        coro: Coroutine[Any, Any, T],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[T]:
        if context is None:
            return asyncio.Task(coro, loop=self, name=name)
        return asyncio.Task(coro, loop=self, name=name, context=context)  # type: ignore[call-arg,unused-ignore]

    def is_running(self) -> bool:
        return not self._closed

    def is_closed(self) -> bool:
        return self._closed

    def get_debug(self) -> bool:
        return False

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        log.error("asyncio: %s", context.get("message"), exc_info=context.get("exception"))

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.call_exception_handler(context)

    # -- the trio side -------------------------------------------------------

    async def _wait(self, future: asyncio.Future[Any]) -> None:
        # Run what is ready first: a call that needs no I/O is done by then.
        self.run_ready()
        if future.done():
            return
        task = trio.lowlevel.current_task()
        waiting = True

        def wake(_: asyncio.Future[Any]) -> None:
            if waiting:
                trio.lowlevel.reschedule(task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            nonlocal waiting
            waiting = False
            return trio.lowlevel.Abort.SUCCEEDED

        future.add_done_callback(wake)
        try:
            await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            waiting = False
            future.remove_done_callback(wake)

    async def run_asyncio(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run an asyncio coroutine on this loop and return its result.

        Cancellation: if the trio caller is cancelled, the asyncio task is
        cancelled and waited for (shielded, at most CLEANUP_TIMEOUT) before
        trio.Cancelled propagates: nothing keeps running behind the caller.

        Raises:
            Whatever the coroutine raises (asyncio.CancelledError included,
            if something on the asyncio side cancelled it).
        """
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            coro.close()  # never to run: not "never awaited" either
            raise
        task = self.create_task(coro)
        try:
            await self._wait(task)
        except BaseException:
            task.cancel()
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT):
                while not task.done():
                    await self._wait(task)
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: the caller's error is the news
            raise
        await trio.lowlevel.cancel_shielded_checkpoint()
        return task.result()

    async def run_trio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await, from asyncio, ``fn(*args)`` run as a trio task of this loop.

        If the awaiting asyncio task is cancelled, the trio task is cancelled
        and waited for before asyncio.CancelledError propagates.
        """
        done = self.create_future()
        scope = trio.CancelScope()

        async def run() -> None:
            try:
                with scope:
                    try:
                        result = await fn(*args)
                    except Exception as exc:
                        if not done.done():
                            done.set_exception(exc)
                        return
                    if not done.done():
                        done.set_result(result)
            finally:
                if not done.done():  # cancelled, or a BaseException on its way out
                    done.cancel()

        self.start_soon(run)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            scope.cancel()
            # Structured: the trio task ends before its awaiter does.
            while not done.done():
                try:
                    await asyncio.shield(done)
                except asyncio.CancelledError:
                    continue
                except BaseException:
                    break
            raise

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Start a trio task that lives as long as this loop at most.

        It is shielded from the cancellation of the loop's block: the loop
        ends its tasks itself, in order, when it closes (a server's handlers
        are cancelled by grpclib, and connections aborted, while the driver
        still runs the callbacks that takes).
        """
        # The scope exists from now on, so that ending the loop reaches a
        # task that has not started running yet.
        scope = trio.CancelScope(shield=True)
        self._scopes.add(scope)
        if self._ended:
            scope.cancel()
        self._nursery.start_soon(self._own, scope, fn, args)

    async def _own(
        self, scope: trio.CancelScope, fn: Callable[..., Awaitable[object]], args: tuple[Any, ...]
    ) -> None:
        try:
            with scope:
                await fn(*args)
        finally:
            self._scopes.discard(scope)

    def _end_tasks(self) -> None:
        self._ended = True
        for scope in self._scopes:
            scope.cancel()

    # -- connections ---------------------------------------------------------

    def _connect(
        self, sock: socket.socket, protocol_factory: Callable[[], asyncio.BaseProtocol]
    ) -> tuple[SocketTransport, asyncio.BaseProtocol]:
        with running_loop(self):
            protocol = protocol_factory()
            transport = SocketTransport(self, sock, protocol)
            protocol.connection_made(transport)
            if self.on_connection is not None:
                self.on_connection(protocol)
        transport.start()
        return transport, protocol

    async def create_unix_connection(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        path: str | None = None,
        **kwargs: Any,
    ) -> tuple[SocketTransport, asyncio.BaseProtocol]:
        if path is None or kwargs.get("ssl") or kwargs.get("sock") is not None:
            raise NotImplementedError("only a plain unix socket path is supported")
        sock = await self.run_trio(_connect_unix, path)
        return self._connect(sock, protocol_factory)

    async def create_connection(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: str | None = None,
        port: int | None = None,
        **kwargs: Any,
    ) -> tuple[SocketTransport, asyncio.BaseProtocol]:
        if host is None or port is None or kwargs.get("ssl") or kwargs.get("sock") is not None:
            raise NotImplementedError("only a plain TCP host and port are supported")
        sock = await self.run_trio(_connect_tcp, host, port)
        return self._connect(sock, protocol_factory)

    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: object = None,
        port: object = None,
        *,
        sock: socket.socket | None = None,
        **kwargs: Any,
    ) -> asyncio.AbstractServer:
        if sock is None or host is not None or port is not None or kwargs.get("ssl"):
            raise NotImplementedError("only an already listening socket is supported")
        if self.make_listener is None:
            raise NotImplementedError("this loop has no listener: set make_listener")
        return self.make_listener(self, sock, protocol_factory)

    async def create_unix_server(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        path: str | None = None,
        *,
        sock: socket.socket | None = None,
        **kwargs: Any,
    ) -> asyncio.AbstractServer:
        return await self.create_server(protocol_factory, path, sock=sock, **kwargs)

    # -- the end ---------------------------------------------------------------

    async def _close(self) -> None:
        for transport in list(self._transports):
            transport.abort()
        pending = [task for task in asyncio.all_tasks(self) if not task.done()]
        for task in pending:
            task.cancel()
        for task in pending:
            while not task.done():
                await self._wait(task)
            if not task.cancelled() and task.exception() is not None:
                log.debug("asyncio task failed at close: %r", task.exception())
        self.run_ready()  # connection_lost callbacks, done callbacks
        self._closed = True


async def _connect_unix(path: str) -> socket.socket:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return socket.socket(fileno=sock.detach())


async def _connect_tcp(host: str, port: int) -> socket.socket:
    stream = await trio.open_tcp_stream(host, port)
    return socket.socket(fileno=stream.socket.detach())


#: The innermost loop opened by this task (its block's code sees it; tests
#: use it to check that no asyncio task is left behind).
current_loop: contextvars.ContextVar[TrioEventLoop | None] = contextvars.ContextVar(
    "boxfiles_loop", default=None
)


@asynccontextmanager
async def open_loop() -> AsyncIterator[TrioEventLoop]:
    """A :class:`TrioEventLoop` for the duration of the block.

    On exit (cancellation and errors included) pending asyncio tasks are
    cancelled and waited for and connections aborted, shielded and bounded
    by CLEANUP_TIMEOUT; no trio task the loop started outlives the block.
    The nursery's exceptions are the caller's to collapse.
    """
    async with trio.open_nursery() as nursery:
        loop = TrioEventLoop(nursery)  # type: ignore[abstract]
        loop.start_soon(loop._drive)
        token = current_loop.set(loop)
        try:
            yield loop
        finally:
            current_loop.reset(token)
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT):
                await loop._close()
            loop._end_tasks()


@final
class SocketTransport(asyncio.Transport):
    """An asyncio transport over a non-blocking socket, waited on by trio.

    Writes go straight to the socket when it takes them; only what it does
    not take is copied into the transport's buffer, and a trio task sends
    that once the socket is writable. Reads are done by a trio task, which
    hands the data to the protocol inside the loop's running turn.
    """

    def __init__(
        self, loop: TrioEventLoop, sock: socket.socket, protocol: asyncio.BaseProtocol
    ) -> None:
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)
        extra: dict[str, Any] = {"socket": sock}
        try:
            extra["peername"] = sock.getpeername()
            extra["sockname"] = sock.getsockname()
        except OSError:
            pass
        super().__init__(extra)
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self._buffer = bytearray()
        self._high = WRITE_BUFFER_HIGH
        self._low = WRITE_BUFFER_HIGH // 4
        self._paused = False  # the protocol was asked to pause writing
        self._closing = False  # close() or abort() called: no more writes
        self._lost = False  # connection_lost scheduled: the socket is closed
        self._reading = trio.Event()
        self._reading.set()
        self._writer: trio.lowlevel.Task | None = None
        self._flushed = trio.Event()  # set when the reader should stop waiting
        #: Bytes received so far: how a listener tells an idle connection.
        self.received = 0
        loop._transports.add(self)

    def start(self) -> None:
        self._loop.start_soon(self._read_loop)
        self._loop.start_soon(self._write_loop)

    # -- reading ---------------------------------------------------------------

    async def _read_loop(self) -> None:
        sock = self._sock
        protocol: Any = self._protocol
        try:
            while not self._closing:
                if not self._reading.is_set():
                    await self._reading.wait()
                    continue
                try:
                    data = sock.recv(READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    await trio.lowlevel.wait_readable(sock)
                    continue
                except OSError as exc:
                    self._fail(exc)
                    return
                if not data:
                    with running_loop(self._loop):
                        keep_open = protocol.eof_received()
                    if not keep_open:
                        self.close()
                    return
                self.received += len(data)
                with running_loop(self._loop):
                    protocol.data_received(data)
                self._loop.run_ready()
                await trio.lowlevel.checkpoint()
        except trio.ClosedResourceError:
            return

    def pause_reading(self) -> None:
        self._reading = trio.Event()

    def resume_reading(self) -> None:
        self._reading.set()

    def is_reading(self) -> bool:
        return self._reading.is_set() and not self._closing

    # -- writing ---------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writelines((data,))

    def writelines(self, list_of_data: Any) -> None:
        # One sendmsg for all of them (a frame's header and its payload).
        pieces = [memoryview(data) for data in list_of_data if data]
        if self._closing or not pieces:
            return  # asyncio drops these too; the connection's loss tells why
        if not self._buffer:
            try:
                sent = self._sock.sendmsg(pieces[:IOV_MAX])  # more fail the call
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(exc)
                return
            while pieces and sent >= len(pieces[0]):
                sent -= len(pieces.pop(0))
            if pieces:
                pieces[0] = pieces[0][sent:]
        for piece in pieces:
            self._keep(piece)

    def _keep(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer what the socket did not take, for the write loop to send."""
        if self._closing:
            return
        self._buffer += data  # the unsent tail: the caller may reuse its buffer
        if len(self._buffer) > MAX_UNSENT:
            self._fail(ConnectionError(f"the peer reads nothing: over {MAX_UNSENT} bytes unsent"))
            return
        if self._writer is not None:
            task, self._writer = self._writer, None
            trio.lowlevel.reschedule(task)
        if not self._paused and len(self._buffer) > self._high:
            self._paused = True
            self._protocol.pause_writing()

    def _abort_wait(self, _: Any) -> trio.lowlevel.Abort:
        self._writer = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _write_loop(self) -> None:
        sock = self._sock
        try:
            while True:
                if not self._buffer:
                    if self._closing:
                        self._lose(None)
                        return
                    self._writer = trio.lowlevel.current_task()
                    await trio.lowlevel.wait_task_rescheduled(self._abort_wait)
                    continue
                await trio.lowlevel.wait_writable(sock)
                try:
                    sent = sock.send(self._buffer)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    self._fail(exc)
                    return
                del self._buffer[:sent]
                if self._paused and len(self._buffer) <= self._low:
                    self._paused = False
                    with running_loop(self._loop):
                        self._protocol.resume_writing()
                    self._loop.run_ready()
        except trio.ClosedResourceError:
            return

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = WRITE_BUFFER_HIGH if high is None else high
        self._low = self._high // 4 if low is None else low

    # -- closing ---------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; close once what is buffered has been sent."""
        if self._closing:
            return
        self._closing = True
        if not self._buffer:
            self._lose(None)
        elif self._writer is not None:
            task, self._writer = self._writer, None
            trio.lowlevel.reschedule(task)

    def abort(self) -> None:
        """Close at once, dropping whatever is unsent."""
        self._closing = True
        self._buffer.clear()
        self._lose(None)

    def _fail(self, exc: OSError) -> None:
        log.debug("connection failed: %r", exc)
        self._closing = True
        self._buffer.clear()
        self._lose(exc)

    def _lose(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._loop._transports.discard(self)
        # Wake the trio tasks waiting on the socket before it goes.
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()
        if self._writer is not None:
            task, self._writer = self._writer, None
            trio.lowlevel.reschedule(task)
        self._reading.set()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    @property
    def is_lost(self) -> bool:
        return self._lost

    @property
    def has_unsent(self) -> bool:
        return bool(self._buffer)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

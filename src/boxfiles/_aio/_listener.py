"""The listener a server's loop accepts connections with: each one set up
as a :class:`SocketTransport`, and the connection limits enforced on them
(refused past the cap, closed when quiet).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import final

import trio

from ._loop import READ_SIZE, SocketTransport, TrioEventLoop

log = logging.getLogger("boxfiles")

#: Seconds a listener pauses after accept() fails for lack of resources
#: (EMFILE and the like), as asyncio's own listener does.
ACCEPT_BACKOFF = 1.0

#: Seconds a connection refused at the cap is read from (and what it sent
#: dropped) after its refusal, before it is closed: closing with its
#: request unread would reset it, and a reset can reach the client before
#: the refusal does. At most MAX_REFUSING linger at once; more are closed
#: at once.
REFUSAL_LINGER = 1.0
MAX_REFUSING = 16


@final
@dataclass(frozen=True)
class ConnectionLimits:
    """What a listener enforces on the connections it accepts."""

    #: Connections open at once; one more is sent ``refusal`` and closed.
    max_connections: int
    #: Seconds without a byte received and without a call in flight after
    #: which a connection is closed (checked every half of it).
    idle_timeout: float
    #: Whether a connection's protocol has no call in flight.
    is_idle: Callable[[asyncio.BaseProtocol], bool]
    #: Bytes sent, best effort, to a connection refused at the cap.
    refusal: bytes


@final
class Listener(asyncio.AbstractServer):
    """Accepts connections on a listening socket the caller owns (and keeps:
    closing the listener stops accepting, it does not close the socket),
    within ``limits``. It runs from when it is made (as a task
    of the loop's)."""

    def __init__(
        self,
        loop: TrioEventLoop,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        limits: ConnectionLimits,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._factory = protocol_factory
        self._limits = limits
        #: Accepted connections, each with the byte count it had at the last
        #: sweep and how many sweeps since have found it quiet.
        self._open: dict[SocketTransport, tuple[int, int]] = {}
        self._refusing = False  # at the cap: logged once per episode
        self._lingering = 0  # refused connections still being drained
        self._scope = trio.CancelScope()
        self._sweep_scope = trio.CancelScope()
        self._stopped = loop.create_future()
        loop.start_soon(self._run)

    async def _run(self) -> None:
        sock = self._sock
        sock.setblocking(False)
        try:
            with self._scope:
                self._loop.start_soon(self._sweep, self._limits)
                while True:
                    try:
                        conn, _ = sock.accept()
                    except (BlockingIOError, InterruptedError):
                        await trio.lowlevel.wait_readable(sock)
                        continue
                    except OSError as exc:
                        log.warning("accepting a connection failed: %s", exc)
                        await trio.sleep(ACCEPT_BACKOFF)
                        continue
                    self._accept(conn)
                    await trio.lowlevel.checkpoint()
        finally:
            self._sweep_scope.cancel()
            if not self._stopped.done():
                self._stopped.set_result(None)

    def _accept(self, conn: socket.socket) -> None:
        self._forget_lost()
        if len(self._open) >= self._limits.max_connections:
            if not self._refusing:
                self._refusing = True
                log.warning("refusing connections: %d open, the most allowed", len(self._open))
            self._refuse(conn, self._limits.refusal)
            return
        self._refusing = False
        try:
            transport, _ = self._loop._connect(conn, self._factory)
        except Exception:  # one bad connection must not stop the server
            log.exception("setting up an accepted connection failed")
            conn.close()
            return
        self._open[transport] = (-1, 0)  # new: as if it had just received

    def _refuse(self, conn: socket.socket, refusal: bytes) -> None:
        conn.setblocking(False)
        try:
            conn.send(refusal)  # a few bytes into an empty buffer: taken whole
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        if self._lingering >= MAX_REFUSING:
            conn.close()
            return
        self._lingering += 1
        self._loop.start_soon(self._linger, conn)

    async def _linger(self, conn: socket.socket) -> None:
        try:
            with trio.move_on_after(REFUSAL_LINGER):
                while True:
                    try:
                        if not conn.recv(READ_SIZE):
                            break  # the client has closed its side
                    except (BlockingIOError, InterruptedError):
                        await trio.lowlevel.wait_readable(conn)
        except OSError:
            pass
        finally:
            self._lingering -= 1
            conn.close()

    def _forget_lost(self) -> None:
        for transport in [t for t in self._open if t.is_lost]:
            del self._open[transport]

    async def _sweep(self, limits: ConnectionLimits) -> None:
        # Every half timeout. A connection is closed at the second sweep
        # after one that saw it receive, the third after one that saw a call
        # in flight (which may end just after): so after one to one and a
        # half timeouts of quiet, never while a call runs.
        with self._sweep_scope:
            while True:
                await trio.sleep(limits.idle_timeout / 2)
                self._forget_lost()
                for transport, (seen, quiet) in list(self._open.items()):
                    now = transport.received
                    if now != seen:
                        quiet = 0
                    elif not limits.is_idle(transport.get_protocol()):
                        quiet = -1
                    else:
                        quiet += 1
                    self._open[transport] = (now, quiet)
                    if quiet < 2:
                        continue
                    log.info("closing a connection quiet for %g s", limits.idle_timeout)
                    # A peer that left replies unread is not reading: no flush.
                    if transport.has_unsent:
                        transport.abort()
                    else:
                        transport.close()

    def close(self) -> None:
        self._scope.cancel()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._stopped)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return not self._stopped.done() and not self._scope.cancel_called

    async def start_serving(self) -> None:
        pass

    async def serve_forever(self) -> None:
        await asyncio.shield(self._stopped)

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

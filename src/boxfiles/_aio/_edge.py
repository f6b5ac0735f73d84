"""What both sides of the edge share: RPC descriptors, and the one place
foreign (grpclib, h2, asyncio, socket) exceptions become boxfiles errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpclib.const
import grpclib.exceptions
import h2.exceptions
import trio
from google.protobuf.message import Message

from .._errors import DeadlineExceeded, FilesError, IncompleteTransfer, Unavailable, remote_error
from .._wire import Method
from ._frames import MessageTooLarge
from ._loop import TrioEventLoop

SendT = TypeVar("SendT", bound=Message)
RecvT = TypeVar("RecvT", bound=Message)
T = TypeVar("T")


_CARDINALITY = {c.value: c for c in grpclib.const.Cardinality}


def cardinality(method: Method[Any, Any]) -> grpclib.const.Cardinality:
    """grpclib's name for ``method``'s shape."""
    return _CARDINALITY[method.client_streaming, method.server_streaming]


def map_exception(exc: BaseException, where: str) -> FilesError:
    """The boxfiles error for a foreign exception raised ``where``."""
    if isinstance(exc, grpclib.exceptions.GRPCError):
        return remote_error(int(exc.status.value), exc.message)
    if isinstance(exc, asyncio.TimeoutError):
        return DeadlineExceeded(f"deadline exceeded {where}")
    if isinstance(exc, grpclib.exceptions.StreamTerminatedError):
        return IncompleteTransfer(f"stream closed {where}: {exc}")
    if isinstance(exc, MessageTooLarge):
        return IncompleteTransfer(f"{exc} {where}")
    if isinstance(exc, (ConnectionError, OSError)):
        return Unavailable(f"cannot reach {where}: {exc}")
    if isinstance(exc, (grpclib.exceptions.ProtocolError, h2.exceptions.H2Error)):
        return IncompleteTransfer(f"protocol error {where}: {exc}")
    if isinstance(exc, asyncio.CancelledError):
        return IncompleteTransfer(f"call cancelled by the transport {where}")
    return IncompleteTransfer(f"{type(exc).__name__} {where}: {exc}")


def run_now(fn: Callable[[], T], where: str) -> T:
    """Run a fast path of the asyncio side that never waits (from the trio
    thread, without a task), mapping its failure as :func:`run` does."""
    try:
        return fn()
    except FilesError:
        raise
    except Exception as exc:  # the edge: every foreign error stops here
        raise map_exception(exc, where) from exc


async def run(loop: TrioEventLoop, coro: Coroutine[Any, Any, T], where: str) -> T:
    """Run an asyncio coroutine from trio, mapping its failure to a FilesError.

    Cancellation: trio.Cancelled propagates once the asyncio side has
    stopped (see :meth:`TrioEventLoop.run_asyncio`).
    """
    try:
        return await loop.run_asyncio(coro)
    except trio.Cancelled:
        raise
    except FilesError:
        raise
    except Exception as exc:  # the edge: every foreign error stops here
        raise map_exception(exc, where) from exc
    except asyncio.CancelledError as exc:  # a BaseException since 3.8
        raise map_exception(exc, where) from exc

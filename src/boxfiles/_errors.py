"""The public exception hierarchy and the rules that pick one error out of many.

Everything here is pure: no I/O, no event loop. The asyncio edge (`_aio`) maps foreign
(grpclib, h2, asyncio) exceptions onto these classes; the transfer code uses
:func:`collapse` to turn whatever a nursery raised into the one error a caller
sees.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Iterator
from typing import ClassVar, final

import trio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


class Status(enum.IntEnum):
    """gRPC status codes, as numbered on the wire."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class FilesError(Exception):
    """Base class of every error a boxfiles call raises."""


@final
class LocalIOError(FilesError):
    """Reading the local source or writing the local destination failed.

    The :class:`OSError` is the ``__cause__``.
    """


@final
class IncompleteTransfer(FilesError):
    """The stream ended early and no status from the peer explains why."""


@final
class UnsafeArchive(FilesError):
    """An archive entry would escape its destination or is of a refused kind."""


class RemoteError(FilesError):
    """The peer answered with a gRPC status other than OK.

    Attributes:
        status: the :class:`Status` the peer sent.
        message: the peer's message (``grpc-message``), or ``""``.
    """

    default_status: ClassVar[Status] = Status.UNKNOWN

    def __init__(self, message: str = "", *, status: Status | None = None) -> None:
        self.status = self.default_status if status is None else status
        self.message = message
        super().__init__(self._describe())

    def _describe(self) -> str:
        return f"{self.status.name}: {self.message}" if self.message else self.status.name

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_remote, (type(self), self.message, self.status))


def _rebuild_remote(cls: type[RemoteError], message: str, status: Status) -> RemoteError:
    return cls(message, status=status)


class InvalidArgument(RemoteError):
    default_status = Status.INVALID_ARGUMENT


class NotFound(RemoteError):
    default_status = Status.NOT_FOUND


class AlreadyExists(RemoteError):
    default_status = Status.ALREADY_EXISTS


class PermissionDenied(RemoteError):
    default_status = Status.PERMISSION_DENIED


class FailedPrecondition(RemoteError):
    default_status = Status.FAILED_PRECONDITION


class ResourceExhausted(RemoteError):
    default_status = Status.RESOURCE_EXHAUSTED


class Unavailable(RemoteError):
    default_status = Status.UNAVAILABLE


class DeadlineExceeded(RemoteError):
    default_status = Status.DEADLINE_EXCEEDED


class Internal(RemoteError):
    """INTERNAL, or any status without a class of its own (``.status`` keeps it)."""

    default_status = Status.INTERNAL


@final
class UploadRejected(RemoteError):
    """The server answered the upload with ``success=false``.

    ``.status`` is OK (the call itself succeeded); ``.message`` is the
    server's ``error``, or "upload failed" when it gave none.
    """

    default_status = Status.OK

    def _describe(self) -> str:
        return f"upload rejected: {self.message}"


_BY_STATUS: dict[Status, type[RemoteError]] = {
    cls.default_status: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Internal,
    )
}


def remote_error(status: int, message: str | None) -> RemoteError:
    """The typed error for a non-OK status received from a peer."""
    try:
        code = Status(status)
    except ValueError:
        code = Status.UNKNOWN
    cls = _BY_STATUS.get(code, Internal)
    return cls(message or "", status=code)


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The non-group exceptions inside ``exc``, depth first."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def _rank(exc: BaseException) -> int:
    # Lower wins. A local failure is the root cause of whatever the peer then
    # reports; a peer's status explains a closed stream; the caller's own
    # cancellation means nobody is waiting for any of it.
    if not isinstance(exc, Exception):
        return 0  # KeyboardInterrupt, SystemExit, trio.Cancelled
    if isinstance(exc, (LocalIOError, UnsafeArchive)):
        return 1
    if isinstance(exc, RemoteError):
        return 2
    if isinstance(exc, FilesError):
        return 3
    return 4  # a bug: let it through untouched rather than disguise it


def collapse(exc: BaseException) -> BaseException:
    """Pick the one exception a caller should see out of ``exc``.

    The winner is returned with the most important loser chained at the end
    of its ``__context__`` chain, so its own cause and context stay as they
    were. Caller cancellation wins outright so that the caller's cancel scope
    can catch it.
    """
    found = sorted(leaves(exc), key=_rank)
    winner = found[0]
    losers = [e for e in found[1:] if e is not winner and not isinstance(e, trio.Cancelled)]
    if losers and not isinstance(winner, trio.Cancelled):
        _chain(winner, losers[0])
    return winner


def _chain(exc: BaseException, loser: BaseException) -> None:
    seen = {id(exc)}
    tail = exc
    while tail.__context__ is not None:
        tail = tail.__context__
        if id(tail) in seen or tail is loser:
            return
        seen.add(id(tail))
    if not any(id(e) in seen for e in _context_chain(loser)):
        tail.__context__ = loser


def _context_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__context__

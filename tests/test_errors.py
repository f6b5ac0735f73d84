"""The error hierarchy and the priority rules, without any I/O."""

from __future__ import annotations

import pickle
import sys

import pytest
import trio

import boxfiles
from boxfiles._errors import Status, collapse, remote_error

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (Status.INVALID_ARGUMENT, boxfiles.InvalidArgument),
        (Status.NOT_FOUND, boxfiles.NotFound),
        (Status.ALREADY_EXISTS, boxfiles.AlreadyExists),
        (Status.PERMISSION_DENIED, boxfiles.PermissionDenied),
        (Status.FAILED_PRECONDITION, boxfiles.FailedPrecondition),
        (Status.RESOURCE_EXHAUSTED, boxfiles.ResourceExhausted),
        (Status.UNAVAILABLE, boxfiles.Unavailable),
        (Status.DEADLINE_EXCEEDED, boxfiles.DeadlineExceeded),
        (Status.INTERNAL, boxfiles.Internal),
        (Status.UNKNOWN, boxfiles.Internal),
        (Status.DATA_LOSS, boxfiles.Internal),
    ],
)
def test_status_maps_to_its_class_and_keeps_its_code(
    status: Status, cls: type[boxfiles.RemoteError]
) -> None:
    err = remote_error(status.value, "why")
    assert type(err) is cls
    assert err.status is status
    assert err.message == "why"
    assert status.name in str(err)


def test_unknown_status_number_is_internal_unknown() -> None:
    err = remote_error(99, None)
    assert type(err) is boxfiles.Internal
    assert err.status is Status.UNKNOWN
    assert err.message == ""


def test_remote_errors_pickle() -> None:
    err = pickle.loads(pickle.dumps(boxfiles.NotFound("x", status=Status.NOT_FOUND)))
    assert type(err) is boxfiles.NotFound
    assert err.message == "x"


def test_upload_rejected_is_a_remote_error() -> None:
    err = boxfiles.UploadRejected("disk quota")
    assert isinstance(err, boxfiles.RemoteError)
    assert err.message == "disk quota"


def test_local_error_wins_over_remote_and_keeps_it_reachable() -> None:
    local = boxfiles.LocalIOError("read failed")
    local.__cause__ = OSError(5, "EIO")
    remote = boxfiles.Internal("stream broke")
    winner = collapse(ExceptionGroup("g", [remote, local]))
    assert winner is local
    assert isinstance(winner.__cause__, OSError)
    chain = []
    cur: BaseException | None = winner
    while cur is not None:
        chain.append(cur)
        cur = cur.__context__
    assert remote in chain


def test_status_wins_over_stream_closed() -> None:
    closed = boxfiles.IncompleteTransfer("stream closed")
    status = boxfiles.PermissionDenied("denied")
    assert collapse(ExceptionGroup("g", [closed, status])) is status
    assert status.__context__ is closed


def test_cancelled_wins_so_the_callers_scope_catches_it() -> None:
    cancelled = trio.Cancelled._create()
    group = BaseExceptionGroup("g", [boxfiles.IncompleteTransfer("reset"), cancelled])
    assert collapse(group) is cancelled


def test_nested_groups_flatten() -> None:
    inner = ExceptionGroup("inner", [boxfiles.IncompleteTransfer("x")])
    local = boxfiles.LocalIOError("y")
    assert collapse(ExceptionGroup("outer", [inner, local])) is local


def test_no_context_cycles() -> None:
    a = boxfiles.Internal("a")
    b = boxfiles.IncompleteTransfer("b")
    b.__context__ = a
    assert collapse(ExceptionGroup("g", [a, b])) is a
    assert a.__context__ is None  # b already chains back to a: no cycle made

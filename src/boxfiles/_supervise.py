"""Running tasks side by side and surfacing exactly one error.

trio's nurseries raise ExceptionGroups; a boxfiles caller must never see
one. Everything that opens a nursery on a public path goes through here.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import trio

from ._errors import collapse

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


@contextmanager
def one_error() -> Iterator[None]:
    """Turn an ExceptionGroup escaping the block into its single most
    important exception (see :func:`boxfiles._errors.collapse`)."""
    winner: BaseException | None = None
    try:
        yield
    except BaseExceptionGroup as group:
        winner = collapse(group)
    if winner is not None:
        raise winner


async def supervise(*tasks: Callable[[], Awaitable[None]]) -> None:
    """Run ``tasks`` in one nursery; raise the single error that matters.

    When one task fails the nursery cancels the others, so a failure on one
    side of a transfer aborts the other side at once, even a task blocked
    forever.
    """
    with one_error():
        async with trio.open_nursery() as nursery:
            for task in tasks:
                nursery.start_soon(task)

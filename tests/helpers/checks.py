"""Leak checks: descriptors, threads, trio tasks, asyncio tasks, resident memory."""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from boxfiles._aio import current_loop


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def our_threads() -> set[int]:
    # trio keeps idle worker threads ("Trio thread N") cached process-wide
    # for reuse; they are the runtime's, not boxfiles', so they are not
    # counted.
    return {t.ident or 0 for t in threading.enumerate() if not t.name.startswith("Trio thread")}


def trio_tasks() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for n in task.child_nurseries for child in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return count(root)


def assert_no_asyncio_tasks() -> None:
    """Inside an open_client block: no asyncio task is left running."""
    loop = current_loop.get()
    assert loop is not None, "call this inside an open_client block"
    assert asyncio.all_tasks(loop) == set()


class Leaks:
    """Snapshot of fds, threads and trio tasks, compared by :meth:`check`."""

    def __init__(self) -> None:
        self.fds = open_fds()
        self.threads = our_threads()
        self.tasks = trio_tasks()

    async def check(self) -> None:
        # A peer notices a closed connection a moment later (EOF then
        # connection_lost); allow it that moment, generously.
        with trio.move_on_after(2):
            while open_fds() - self.fds:
                await trio.sleep(0.01)
        assert open_fds() - self.fds == set(), "file descriptors leaked"
        assert our_threads() - self.threads == set(), "threads leaked"
        assert trio_tasks() == self.tasks, "trio tasks leaked"


def rss() -> int:
    """Resident memory once glibc has handed back what nobody uses.

    Without the trim, RSS would show the allocator's cache of freed memory
    (64 concurrent transfers free a lot at once), not what is still held.
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class TaskSteps(trio.abc.Instrument):
    """Counts the steps trio runs of the tasks whose name ends with
    ``suffix``, from when ``after`` is set; counts while :meth:`counting`."""

    def __init__(self, suffix: str, after: trio.Event) -> None:
        self.steps = 0
        self._suffix = suffix
        self._after = after

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._after.is_set() and task.name.endswith(self._suffix):
            self.steps += 1

    @contextmanager
    def counting(self) -> Iterator[None]:
        trio.lowlevel.add_instrument(self)
        try:
            yield
        finally:
            trio.lowlevel.remove_instrument(self)

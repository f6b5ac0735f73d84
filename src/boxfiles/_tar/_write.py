"""Writing tar, the same for both sides (pure, no I/O): the client's
copy_in and the server's Download build their headers here.

Headers are PAX: long and non-ASCII names need no GNU extensions, and
``surrogateescape`` keeps a name that is not UTF-8 byte for byte. Both
sides pack a directory, a symlink and a regular file, and a second name of
a multiply-linked file as a hard link to the first. What to do with
anything else differs by side and is decided there (see :func:`member`).
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable
from typing import final

from ._paxtime import set_mtime_ns

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE

#: The end-of-archive marker: two zero blocks.
END = bytes(2 * BLOCK)

_ENCODING = "utf-8"
_ERRORS = "surrogateescape"


def header(info: tarfile.TarInfo) -> bytes:
    """``info`` as header blocks (PAX extended header first when needed)."""
    return info.tobuf(tarfile.PAX_FORMAT, _ENCODING, _ERRORS)


def padding(size: int, unit: int = BLOCK) -> int:
    """Zero bytes that follow ``size`` bytes of data to fill a ``unit``."""
    return -size % unit


@final
class HardLinks:
    """Names already packed for files with more than one link."""

    def __init__(self) -> None:
        self._first: dict[tuple[int, int], str] = {}

    def first(self, st: os.stat_result) -> str | None:
        """The name ``st``'s inode was packed as, or None."""
        return self._first.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None

    def packed(self, st: os.stat_result, arcname: str) -> None:
        """A regular file was packed as ``arcname``: later names of its inode
        become hard links to it."""
        if st.st_nlink > 1:
            self._first.setdefault((st.st_dev, st.st_ino), arcname)


def member(
    arcname: str, st: os.stat_result, links: HardLinks, readlink: Callable[[], str]
) -> tarfile.TarInfo | None:
    """The header for an entry with (lstat) ``st``; ``readlink`` is called
    for a symlink. A regular file's ``size`` is ``st``'s (a caller that
    opens the file may correct it before writing the header), and the
    caller tells ``links`` once its data is packed.

    None for a socket, fifo or device node: the server skips them (a
    container's tree routinely holds them, and downloading ``/`` must not
    fail on them); copy_in refuses a fifo or device node and skips a socket
    (the user named the source, so there a special file is a mistake to
    report, and no server accepts one in an upload).
    """
    info = tarfile.TarInfo(arcname)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        first = links.first(st)
        if first is None:
            info.type = tarfile.REGTYPE
            info.size = st.st_size
        else:
            info.type = tarfile.LNKTYPE
            info.linkname = first
    elif stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(mode):
        info.type = tarfile.SYMTYPE
        info.linkname = readlink()
    else:
        return None
    info.mode = stat.S_IMODE(mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    set_mtime_ns(info, st.st_mtime_ns)
    return info

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
from functools import lru_cache
from typing import final

from ._paxtime import set_mtime_ns

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE

#: The end-of-archive marker: two zero blocks.
END = bytes(2 * BLOCK)

_ENCODING = "utf-8"
_ERRORS = "surrogateescape"


def header(info: tarfile.TarInfo) -> bytes:
    """``info`` as header blocks (PAX extended header first when needed):
    exactly the bytes of ``info.tobuf(tarfile.PAX_FORMAT, "utf-8",
    "surrogateescape")``, built here for the entries both sides pack
    (ASCII names), at a quarter of tarfile's cost: with small files, headers
    are most of what packing costs. Anything else is tarfile's to build."""
    built = _ascii_header(info)
    return built if built is not None else info.tobuf(tarfile.PAX_FORMAT, _ENCODING, _ERRORS)


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


_PACKED_TYPES = frozenset((tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE))
_PAX_NAME = b"././@PaxHeader"
#: Device numbers (unused), the prefix (PAX never splits a name) and the
#: rest of the block.
_USTAR_TAIL = bytes(2 * 8 + 155 + 12)
_FIXED_SUM = sum(tarfile.POSIX_MAGIC) + 8 * ord(" ")


def _ascii_header(info: tarfile.TarInfo) -> bytes | None:
    """tarfile's ``create_pax_header`` for a regular file, directory,
    symlink or hard link whose strings are all ASCII; None otherwise."""
    name, linkname, uname, gname = info.name, info.linkname, info.uname, info.gname
    texts = (name, linkname, uname, gname)
    if info.type not in _PACKED_TYPES or not all(type(t) is str and t.isascii() for t in texts):
        return None
    if info.type == tarfile.DIRTYPE and not name.endswith("/"):
        name += "/"
    pax = dict(info.pax_headers)
    for text, keyword, length in (
        (name, "path", 100),
        (linkname, "linkpath", 100),
        (uname, "uname", 32),
        (gname, "gname", 32),
    ):
        if keyword not in pax and len(text) > length:
            pax[keyword] = text
    numbers = []
    for keyword, value, digits in (
        ("uid", info.uid, 8),
        ("gid", info.gid, 8),
        ("size", info.size, 12),
        ("mtime", info.mtime, 12),
    ):
        if type(value) is not int:
            return None  # a float is rounded, None refused: tarfile's way
        if not 0 <= value < 8 ** (digits - 1):
            pax.setdefault(keyword, str(value))
            value = 0
        numbers.append(value)
    if not all(type(v) is str and k.isascii() and v.isascii() for k, v in pax.items()):
        return None
    uid, gid, size, mtime = numbers
    entry = _ustar(
        name.encode(), info.mode & 0o7777, uid, gid, size, mtime, info.type,
        linkname.encode(), uname.encode(), gname.encode(),
    )  # fmt: skip
    if not pax:
        return entry
    records = b"".join(_pax_record(keyword, value) for keyword, value in pax.items())
    return b"".join((_pax_header(len(records)), records, bytes(padding(len(records))), entry))


@lru_cache(maxsize=64)
def _pax_header(size: int) -> bytes:
    """The header block of a PAX extended header of ``size`` bytes (most
    headers are an mtime record: a few sizes recur)."""
    return _ustar(_PAX_NAME, 0, 0, 0, size, 0, tarfile.XHDTYPE, b"", b"", b"")


def _pax_record(keyword: str, value: str) -> bytes:
    """``"<length> <keyword>=<value>\n"``, the length counting itself."""
    body = len(keyword) + len(value) + 3  # " ", "=" and "\n"
    length = 0
    while (total := body + len(str(length))) != length:
        length = total
    return b"%d %s=%s\n" % (length, keyword.encode(), value.encode())


def _ustar(
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    kind: bytes,
    linkname: bytes,
    uname: bytes,
    gname: bytes,
) -> bytes:
    """One ustar header block, as tarfile's ``_create_header`` makes it
    (strings cut to their fields, numbers in octal that fit)."""
    name, linkname, uname, gname = name[:100], linkname[:100], uname[:32], gname[:32]
    numbers = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (mode, uid, gid, size, mtime)
    # The checksum counts its own field as spaces; the NULs add nothing.
    checksum = (
        sum(name) + sum(numbers) + kind[0] + sum(linkname) + sum(uname) + sum(gname) + _FIXED_SUM
    )
    return b"".join((
        name.ljust(100, b"\0"),
        numbers,
        b"%06o\0 " % checksum,
        kind,
        linkname.ljust(100, b"\0"),
        tarfile.POSIX_MAGIC,
        uname.ljust(32, b"\0"),
        gname.ljust(32, b"\0"),
        _USTAR_TAIL,
    ))  # fmt: skip

"""Reading a tar stream in an extraction thread, with file data left uncopied.

tarfile's stream mode (``r|``) reads ahead in its own buffer and hands each
member's data out through two more copies. Here tarfile reads only headers,
in its seekable mode, through a stream whose seeks go forward only (all
that mode does while members are taken in order); a regular member's data
goes from the received chunks to its file descriptor by ``os.write`` on
slices of them, copied by nothing but the kernel.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Sequence
from typing import TypeVar, cast, final

import trio

from .._wire import IOV_MAX

#: Most header bytes one entry may have: its header block plus every PAX
#: (``x``, ``g``) and GNU long name/link (``L``, ``K``) header before it.
#: A 4 KiB long name and ordinary PAX records fit many times over; a larger
#: header is refused before it is read into memory.
MAX_ENTRY_HEADER_BYTES = 64 * 1024

#: Most bytes of global PAX (``g``) headers in one archive. tarfile merges
#: them all into one dict kept for the whole archive; real archives have at
#: most one, of a few records.
MAX_GLOBAL_HEADER_BYTES = 1024 * 1024

#: Longest run of ASCII digits in a PAX header. The interpreter's tarfile
#: (before CVE-2024-6232 was fixed) searches the header with a regex that is
#: quadratic in such a run; this bound keeps it linear in the header size.
#: Numbers (sizes, times) and ordinary names are far shorter.
MAX_PAX_DIGIT_RUN = 256

#: Most chunks a ChunkStream takes from its channel per hop to the trio
#: thread: the one it waits for and those already queued behind it. The
#: reading thread then holds up to this many chunks instead of one.
REFILL_CHUNKS = 4

_BLOCK = tarfile.BLOCKSIZE

#: Header types whose body is more header: PAX (x, Solaris X, global g) and
#: GNU long name/link (L, K).
_EXTENSION_TYPES = frozenset(b"xXgLK")
_PAX_TYPES = frozenset(b"xXg")
#: GNU sparse members (type S, or PAX GNU.sparse.* keys) are refused: their
#: holes expand a small archive into unbounded writes, and our packer never
#: writes them.
_SPARSE_TYPE = ord("S")
_DIGIT_RUN = re.compile(rb"[0-9]{%d}" % (MAX_PAX_DIGIT_RUN + 1))


class CorruptArchive(tarfile.ReadError):
    """The archive is malformed or hostile; the message names the byte offset."""


class TruncatedArchive(tarfile.ReadError):
    """The archive ended before its end-of-archive blocks."""


@final
class ChunkStream:
    """A forward-only, blocking byte stream over a trio channel of chunks.

    Used from a worker thread. A chunk is a sequence of pieces (a message
    as the frames it came in, never joined). Chunks are received, up to
    REFILL_CHUNKS at a time (those already queued), and the ones before
    them released, in the trio thread that allocated them (glibc then
    reuses that memory for the next chunks rather than faulting in fresh
    pages). A receive inherits the host task's cancellation, so a cancelled
    transfer stops the thread at its next refill.
    """

    def __init__(self, channel: trio.MemoryReceiveChannel[Sequence[bytes | memoryview]]) -> None:
        self._channel = channel
        #: The chunks received last, as the pieces they came in (a
        #: message's frames), held until the next are received; the piece
        #: being read, where in it, and the next piece's index.
        self._pieces: Sequence[bytes | memoryview] = ()
        self._chunk: bytes | memoryview = b""
        self._start = 0
        self._next = 0
        #: Bytes handed out or skipped so far.
        self.taken = 0
        #: The channel has ended: every byte has been received.
        self.eof = False
        #: The last block tarfile read as a header, and its offset: where
        #: tarfile stopped if it found no further member.
        self._last_header = b""
        self._last_header_at = 0
        #: The extension header whose body tarfile reads next: (type, size).
        self._body: tuple[int, int] | None = None
        #: Header bytes read for the current entry and, of global PAX
        #: headers, for the whole archive.
        self._entry_header_bytes = 0
        self._global_header_bytes = 0

    async def _refill(self) -> None:
        # Drops every view of the chunks before, here in the trio thread.
        self._pieces, self._next, self._chunk, self._start = (), 0, b"", 0
        try:
            chunks = [await self._channel.receive()]
        except trio.EndOfChannel:
            self.eof = True
            return
        # The chunks queued behind it come along. A hop to the trio thread
        # and back costs more than writing a MiB to tmpfs: one per chunk
        # made the server's extraction thread the slowest stage of an upload.
        while len(chunks) < REFILL_CHUNKS:
            try:
                chunks.append(self._channel.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break  # the end is met by the next refill
        self._pieces = chunks[0] if len(chunks) == 1 else [p for c in chunks for p in c]

    def _available(self) -> int:
        """Bytes left in the current piece, moving on to the next when it is
        used up (0 at the end)."""
        while self._start == len(self._chunk):
            if self._next < len(self._pieces):
                self._chunk, self._start = self._pieces[self._next], 0
                self._next += 1
            elif self.eof:
                break
            else:
                trio.from_thread.run(self._refill)
        return len(self._chunk) - self._start

    def _advance(self, count: int) -> None:
        self._start += count
        self.taken += count

    def read(self, size: int = -1, /) -> bytes:
        """Exactly ``size`` bytes, fewer only at the end (for tarfile's headers).

        Each header is checked before tarfile parses it (see check_header).

        Raises:
            CorruptArchive: a header breaks a bound or is malformed.
            tarfile.ReadError: ``size`` is negative.
        """
        at = self.taken
        if size < 0:
            raise tarfile.ReadError(f"archive header declares a negative size ({size})")
        if size == 1:  # tarfile probing that the previous member's data is all there
            return self._take(size)
        self._entry_header_bytes += size
        if self._entry_header_bytes > MAX_ENTRY_HEADER_BYTES:
            raise CorruptArchive(
                f"archive headers at byte {at} exceed {MAX_ENTRY_HEADER_BYTES} bytes for one entry"
            )
        data = self._take(size)
        if self._body is not None:
            kind, declared = self._body
            self._body = None
            _check_extension(kind, data[:declared], data[declared:], at)
        elif size == _BLOCK:
            self._last_header, self._last_header_at = data, at
            self._body = _check_header(data, at)
            if self._body is not None and self._body[0] == ord("g"):
                self._global_header_bytes += self._body[1]
                if self._global_header_bytes > MAX_GLOBAL_HEADER_BYTES:
                    raise CorruptArchive(
                        f"global PAX headers at byte {at} exceed"
                        f" {MAX_GLOBAL_HEADER_BYTES} bytes for one archive"
                    )
        return data

    def _take(self, size: int) -> bytes:
        pieces = []
        left = size
        while left and (got := self._available()):
            take = min(left, got)
            pieces.append(self._chunk[self._start : self._start + take])
            self._advance(take)
            left -= take
        return b"".join(pieces)

    def tell(self) -> int:
        return self.taken

    def seekable(self) -> bool:
        return True  # forward, which is all tarfile asks of it

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        """Skip forward to ``offset``, or to the end if the stream ends first.

        Raises:
            tarfile.ReadError: a seek backwards, or relative to the end; the
                seekable mode only makes those on an archive it cannot
                stream (it is corrupt).
        """
        if whence == os.SEEK_CUR:
            offset += self.taken
        elif whence != os.SEEK_SET:
            raise tarfile.ReadError("cannot seek relative to the end of a stream")
        if offset < self.taken:
            raise tarfile.ReadError("archive would have to be read backwards")
        while self.taken < offset and (got := self._available()):
            self._advance(min(got, offset - self.taken))
        return self.taken

    def drain(self) -> None:
        """Skip to the end."""
        while got := self._available():
            self._advance(got)

    def start_entry(self) -> None:
        """Count header bytes afresh: tarfile is about to read the next entry's."""
        self._entry_header_bytes = 0

    def end_of_archive(self) -> None:
        """Check that tarfile stopped at an end-of-archive marker, and read to the end.

        A valid end is two zero blocks; after them only zero bytes may follow
        (the padding of the last record). GNU tar ignores anything there, but
        data after the marker (a second archive appended, say) would be lost
        without a word, so it is refused.

        Raises:
            TruncatedArchive: the stream ended before the two zero blocks.
            CorruptArchive: non-zero bytes where a header, the marker or its
                padding should be.
        """
        block, at = self._last_header, self._last_header_at
        if len(block) < _BLOCK:
            raise TruncatedArchive(
                f"archive ends at byte {at + len(block)} without its end-of-archive blocks"
            )
        if block.count(0) != _BLOCK:
            raise CorruptArchive(f"corrupt archive header at byte {at}")
        second = self._take(_BLOCK)
        if len(second) < _BLOCK:
            raise TruncatedArchive(
                f"archive ends at byte {self.taken} inside its end-of-archive blocks"
            )
        _check_zeros(second, at + _BLOCK, "in the end-of-archive marker")
        while got := self._available():
            start = self._start
            _check_zeros(
                self._chunk[start : start + got], self.taken, "after the end-of-archive marker"
            )
            self._advance(got)

    def write_to(self, fd: int, size: int) -> None:
        """Write the next ``size`` bytes to ``fd``.

        Raises:
            tarfile.ReadError: the stream ended first.
            OSError: writing failed.
        """
        left = size
        while left:
            if not self._available():
                raise tarfile.ReadError("unexpected end of data")
            left -= self._write_pieces(fd, left)

    def _write_pieces(self, fd: int, limit: int) -> int:
        """Write up to ``limit`` bytes of the chunk at hand, from where the
        stream is, in one ``writev`` (a message's data comes in as many
        pieces as the frames it came in); the bytes written."""
        # A function of its own: its views are gone when it returns, so the
        # chunk is released in the trio thread by the next refill, not here.
        views = [memoryview(self._chunk)[self._start : self._start + limit]]
        size = len(views[0])
        for piece in self._pieces[self._next : self._next + IOV_MAX - 1]:
            if size >= limit:
                break
            views.append(memoryview(piece)[: limit - size])
            size += len(views[-1])
        written = os.writev(fd, views)
        self.taken += written
        left = written
        while True:
            step = min(left, len(self._chunk) - self._start)
            self._start += step
            left -= step
            if not left:
                return written
            # The piece at hand is used up: the rest was in the next ones.
            self._chunk, self._start = self._pieces[self._next], 0
            self._next += 1


def open_archive(stream: ChunkStream) -> tarfile.TarFile:
    """A TarFile reading headers from ``stream``; its first header is read now.

    Raises:
        tarfile.ReadError: the stream does not start with a tar header.
    """
    return tarfile.open(fileobj=stream, mode="r:", tarinfo=_TarInfo)  # type: ignore[call-overload, no-any-return]


_T = TypeVar("_T", bound=tarfile.TarInfo)

#: Entry types whose header :class:`_TarInfo` reads itself.
_PLAIN_TYPES = frozenset(
    (tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.XHDTYPE)
)
#: The number fields tarfile reads: mode, uid, gid, size, mtime, checksum,
#: device major and minor.
_NUMBER_FIELDS = (
    (100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (329, 337), (337, 345)
)  # fmt: skip


class _TarInfo(tarfile.TarInfo):
    """tarfile's TarInfo with a faster ``frombuf`` (a public classmethod
    TarFile calls through its ``tarinfo`` class) for the headers every
    archive is made of: a regular file, directory, symlink or hard link in
    octal numbers, and a PAX header. Those it reads as tarfile does, into
    the same object in half the time (``tests/tar/test_read.py``
    compares the two on mutated headers); anything else, or anything
    tarfile would refuse, is tarfile's own to read or refuse."""

    __slots__ = ()

    @classmethod
    def frombuf(cls: type[_T], buf: bytes | bytearray, encoding: str, errors: str) -> _T:
        if len(buf) != _BLOCK or buf[156:157] not in _PLAIN_TYPES:
            return super().frombuf(buf, encoding, errors)
        try:
            mode, uid, gid, size, mtime, checksum, major, minor = (
                int(buf[a:b].split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)
                for a, b in _NUMBER_FIELDS
            )
        except ValueError:  # base-256 numbers, or none: tarfile's to read or refuse
            return super().frombuf(buf, encoding, errors)
        if not _checksum_matches(bytes(buf)):
            return super().frombuf(buf, encoding, errors)  # tarfile's to refuse
        obj = cls()
        obj.name = buf[0:100].split(b"\0", 1)[0].decode(encoding, errors)
        obj.mode, obj.uid, obj.gid, obj.size, obj.mtime = mode, uid, gid, size, mtime
        obj.chksum = checksum
        obj.type = bytes(buf[156:157])
        obj.linkname = buf[157:257].split(b"\0", 1)[0].decode(encoding, errors)
        obj.uname = buf[265:297].split(b"\0", 1)[0].decode(encoding, errors)
        obj.gname = buf[297:329].split(b"\0", 1)[0].decode(encoding, errors)
        obj.devmajor, obj.devminor = major, minor
        prefix = buf[345:500].split(b"\0", 1)[0].decode(encoding, errors)
        if obj.type == tarfile.DIRTYPE:
            obj.name = obj.name.rstrip("/")
        if prefix:
            obj.name = prefix + "/" + obj.name
        return obj


def next_member(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    """The next member's header, or None at the end of the archive.

    Raises what ``TarFile.next`` raises: tarfile.ReadError for a corrupt or
    truncated header, ValueError or OverflowError for absurd numbers in one.
    """
    stream = cast(ChunkStream, tar.fileobj)  # open_archive opened it over one
    stream.start_entry()
    member = tar.next()
    # tarfile keeps every header it read; drop them so memory does not grow
    # with the number of entries.
    tar.members.clear()  # type: ignore[attr-defined]
    if member is None:
        # tarfile also ends quietly at a bad or short header: only an
        # end-of-archive marker is the end.
        stream.end_of_archive()
    return member


def write_member(member: tarfile.TarInfo, stream: ChunkStream, fd: int) -> None:
    """Write a regular member's data to ``fd``; the stream must be at its data.

    Raises:
        tarfile.ReadError: the data ended early.
        OSError: writing failed.
    """
    stream.write_to(fd, member.size)


def _check_header(block: bytes, at: int) -> tuple[int, int] | None:
    """Check a header block; return (type, size) if its body is more header.

    A block tarfile would not accept as a header (zero, bad checksum) is left
    to it: it stops there, and ``end_of_archive`` decides.

    Raises:
        CorruptArchive: a sparse member, or an extension header too large.
    """
    if block.count(0) == _BLOCK or not _checksum_matches(block):
        return None
    size = _octal(block[124:136])
    kind = block[156]
    if kind == _SPARSE_TYPE:
        raise CorruptArchive(f"archive entry at byte {at} is a GNU sparse file: not accepted")
    if kind not in _EXTENSION_TYPES:
        return None
    if size > MAX_ENTRY_HEADER_BYTES:
        raise CorruptArchive(
            f"archive header at byte {at} declares {size} bytes of extension"
            f" (at most {MAX_ENTRY_HEADER_BYTES})"
        )
    return kind, size


def _checksum_matches(block: bytes) -> bool:
    """Whether the checksum field holds the block's sum, as tarfile takes
    it: unsigned bytes, or (some old tars) signed; the field itself counts
    as spaces."""
    field = block[148:156]
    checksum = _octal(field)
    if checksum == sum(block) - sum(field) + 256:
        return True
    signed = memoryview(block).cast("b")
    return checksum == sum(signed) - sum(signed[148:156]) + 256


def _octal(field: bytes) -> int:
    """A header's octal number field; -1 if it is not one (tarfile judges it)."""
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return -1


def _check_extension(kind: int, body: bytes, padding: bytes, at: int) -> None:
    """Check an extension header's body, in time linear in its size.

    Raises:
        CorruptArchive: a malformed PAX header, or one with GNU.sparse keys.
    """
    if len(body) + len(padding) != -(-len(body) // _BLOCK) * _BLOCK:
        return  # short: tarfile reports the truncation
    _check_zeros(padding, at + len(body), "in the padding of an extension header")
    if kind not in _PAX_TYPES:
        return
    if run := _DIGIT_RUN.search(body):
        raise CorruptArchive(
            f"PAX header at byte {at + run.start()} has more than"
            f" {MAX_PAX_DIGIT_RUN} digits in a row"
        )
    pos = 0
    while pos < len(body):
        # "LEN key=value\n", LEN counting the whole record.
        space = body.find(b" ", pos, pos + 21)
        digits = body[pos:space]
        if space < 0 or not digits.isdigit():
            raise CorruptArchive(f"malformed PAX record at byte {at + pos}: no length")
        end = pos + int(digits)
        equals = body.find(b"=", space + 1, end)
        if end > len(body) or equals <= space + 1 or body[end - 1] != ord("\n"):
            raise CorruptArchive(f"malformed PAX record at byte {at + pos}")
        if body.startswith(b"GNU.sparse.", space + 1):
            raise CorruptArchive(
                f"PAX header at byte {at} describes a GNU sparse file: not accepted"
            )
        pos = end


def _check_zeros(data: bytes | memoryview, at: int, where: str) -> None:
    """Raise CorruptArchive naming the first non-zero byte of ``data`` (at offset ``at``)."""
    stripped = bytes(data).lstrip(b"\0")
    if stripped:
        raise CorruptArchive(f"non-zero byte {where} at byte {at + len(data) - len(stripped)}")

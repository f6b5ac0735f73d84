"""Corrupt and hostile tar shapes, built byte by byte, for both sides' tests."""

from __future__ import annotations

import io
import tarfile

BLOCK = tarfile.BLOCKSIZE


def member_bytes(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE) -> bytes:
    """One ustar member, header and padded data, with no end-of-archive marker."""
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    info.mtime = 1_700_000_000
    body = data if kind == tarfile.REGTYPE else b""
    return info.tobuf(format=tarfile.USTAR_FORMAT) + body + padding(len(body))


def extension(kind: bytes, body: bytes) -> bytes:
    """An extension header (PAX x/g, GNU L/K) carrying ``body`` verbatim."""
    info = tarfile.TarInfo("././@ext")
    info.type = kind
    info.size = len(body)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + body + padding(len(body))


def pax_record(key: str, value: str) -> bytes:
    """One well-formed ``LEN key=value\\n`` record."""
    rest = f" {key}={value}\n".encode()
    length = len(rest) + 1
    while len(str(length)) + len(rest) != length:
        length += 1
    return str(length).encode() + rest


def padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


END = b"\0" * (2 * BLOCK)


def sparse_member(name: str) -> bytes:
    """An old-GNU sparse member (type S) claiming a 512 MiB file of holes."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 0
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[483:495] = b"%011o\0" % (512 * 1024 * 1024)  # realsize
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def corrupt_shapes() -> dict[str, tuple[bytes, str]]:
    """Archives that start with a valid member ("ok") and go wrong after it.

    Maps a name to (archive, what the error names). None is a whole archive;
    "truncated" ones end early, the rest are corrupt.
    """
    ok = member_bytes("ok", b"fine")
    later = bytearray(member_bytes("later", b"y"))
    later[148] ^= 1  # a bad checksum
    end_one_byte = bytearray(END)
    end_one_byte[BLOCK + 100] = 1
    return {
        "garbage-after-member": (ok + b"\x07" * 4096, f"byte {len(ok)}"),
        "garbage-block-then-end": (ok + b"\x07" * BLOCK + END, f"byte {len(ok)}"),
        "bad-checksum-later": (ok + bytes(later) + END, f"byte {len(ok)}"),
        "non-zero-in-end-marker": (ok + bytes(end_one_byte), f"byte {len(ok) + BLOCK + 100}"),
        "non-zero-after-end": (ok + END + b"\0" * 100 + b"!", f"byte {len(ok) + 2 * BLOCK + 100}"),
        "appended-archive": (ok + END + ok + END, f"byte {len(ok) + 2 * BLOCK}"),
        "malformed-pax": (extension(b"x", b"garbage\n") + ok + END, "malformed PAX record"),
        "pax-length-past-end": (
            extension(b"x", b"99 path=a\n") + ok + END,
            "malformed PAX record",
        ),
        "pax-digits": (
            extension(b"x", pax_record("comment", "9" * 60_000)) + ok + END,
            "digits in a row",
        ),
        "pax-cve-2024-6232": (extension(b"x", b"1" * 60_000) + ok + END, "digits in a row"),
        "oversized-pax": (
            extension(b"x", pax_record("comment", "c" * 70_000)) + ok + END,
            "extension",
        ),
        "oversized-long-name": (extension(b"L", b"n" * 70_000 + b"\0") + ok + END, "extension"),
        "many-long-names": (
            extension(b"L", b"n" * 30_000 + b"\0") * 3 + ok + END,
            "for one entry",
        ),
        "global-pax-flood": (
            (extension(b"g", pax_record("comment", "c" * 60_000)) + ok) * 20 + END,
            "for one archive",
        ),
        "sparse-gnu": (ok + sparse_member("holes") + END, "sparse"),
        "sparse-pax-0.0": (
            extension(b"x", pax_record("GNU.sparse.size", "536870912")) + ok + END,
            "sparse",
        ),
        "sparse-pax-1.0": (
            extension(
                b"x", pax_record("GNU.sparse.major", "1") + pax_record("GNU.sparse.minor", "0")
            )
            + ok
            + END,
            "sparse",
        ),
    }


def truncated_shapes() -> dict[str, bytes]:
    """Archives with a valid member ("ok") that end before their end marker."""
    ok = member_bytes("ok", b"fine")
    return {
        "no-end-marker": ok,
        "one-end-block": ok + END[:BLOCK],
        "half-end-block": ok + END[: BLOCK + 100],
        "partial-header": ok + member_bytes("next")[:300],
    }


def whole(*members: bytes) -> bytes:
    """A complete archive of ``members``."""
    return b"".join(members) + END


def long_name_archive() -> bytes:
    """A valid PAX archive with a 4 KiB name and ordinary records: must pass."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("/".join(["n" * 200] * 20))
        info.size = 1
        info.pax_headers = {"comment": "ordinary", "mtime": "1700000000.5"}
        tar.addfile(info, io.BytesIO(b"z"))
    return out.getvalue()

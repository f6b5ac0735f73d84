"""Exact modification times in tar headers (pure, no I/O).

A ustar header holds whole seconds and tarfile turns a PAX ``mtime`` into a
float, which loses nanoseconds; both sides of boxfiles write and read the PAX
record as an exact decimal instead.
"""

from __future__ import annotations

import tarfile

NS = 10**9


def set_mtime_ns(info: tarfile.TarInfo, mtime_ns: int) -> None:
    """Give ``info`` the modification time ``mtime_ns``, exactly."""
    info.mtime = mtime_ns // NS
    whole, nanos = divmod(abs(mtime_ns), NS)
    if nanos:
        sign = "-" if mtime_ns < 0 else ""
        info.pax_headers = {**info.pax_headers, "mtime": f"{sign}{whole}.{nanos:09d}".rstrip("0")}


def mtime_ns(member: tarfile.TarInfo) -> int:
    """The modification time of ``member`` in nanoseconds, exactly as written."""
    text = member.pax_headers.get("mtime")
    if text is not None:
        whole, _, frac = text.partition(".")
        if whole.lstrip("-").isdigit() and (not frac or frac.isdigit()):
            sign = -1 if whole.startswith("-") else 1
            return int(whole) * NS + sign * int((frac + "000000000")[:9])
    return round(member.mtime * NS)

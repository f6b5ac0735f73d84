"""Headers built by boxfiles are tarfile's, byte for byte."""

from __future__ import annotations

import tarfile

from hypothesis import given
from hypothesis import strategies as st

from boxfiles._tar._paxtime import set_mtime_ns
from boxfiles._tar._write import _ascii_header, header

#: Mostly ASCII with "/" (long paths), some non-ASCII and undecodable bytes
#: (surrogate escapes): the last two are tarfile's to build.
_texts = st.text(
    st.one_of(
        st.sampled_from("abc/._-~ "),
        st.characters(min_codepoint=0x20, max_codepoint=0x7E),
        st.sampled_from("é漢\udcff"),
    ),
    max_size=260,
)
_types = st.sampled_from(
    [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE]
)


@given(
    name=_texts,
    kind=_types,
    linkname=_texts,
    uname=_texts,
    gname=_texts,
    mode=st.integers(0, 0o177777),
    uid=st.integers(0, 2**40),
    gid=st.integers(0, 2**40),
    size=st.integers(0, 2**40),
    mtime_ns=st.integers(-(2**62), 2**64),
)
def test_headers_are_tarfiles_pax_headers(
    name: str,
    kind: bytes,
    linkname: str,
    uname: str,
    gname: str,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime_ns: int,
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.uname, info.gname = kind, linkname, uname, gname
    info.mode, info.uid, info.gid, info.size = mode, uid, gid, size
    set_mtime_ns(info, mtime_ns)
    expected = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    assert header(info) == expected
    built_here = kind != tarfile.FIFOTYPE and all(
        text.isascii() for text in (name, linkname, uname, gname)
    )
    assert (_ascii_header(info) is not None) == built_here


def test_a_common_entry_is_built_here() -> None:
    info = tarfile.TarInfo("tree/dir/file.txt")
    info.size, info.mode, info.uname, info.gname = 1024, 0o644, "root", "root"
    set_mtime_ns(info, 1_733_300_000_123_456_789)
    built = _ascii_header(info)
    assert built is not None
    assert built == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    assert len(built) == 3 * tarfile.BLOCKSIZE  # PAX header (mtime), its record, the entry

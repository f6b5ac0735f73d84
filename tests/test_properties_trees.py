"""Property tests over whole trees: any small tree survives copy_in then
copy_out exactly, and no hostile archive ever writes outside the container
root (upload_tar to the reference server) or outside the destination
(copy_out from a server sending it verbatim)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import tarfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import boxfiles
from boxfiles._aio import ServerCall
from boxfiles._proto.files_pb2 import DownloadChunk, DownloadRequest
from boxfiles.testing import short_socket_dir

from .helpers import tarshapes
from .helpers.archives import BytesReader
from .helpers.scripted import DownloadScript, scripted_server

KiB = 1024
PROMPT = 10.0  # generous guard against a hang; never a speed claim
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    # Trees and archives are built on disk per example; that is the point.
    suppress_health_check=[HealthCheck.too_slow],
)


@asynccontextmanager
async def reference_server(root: Path, sock_dir: Path) -> AsyncIterator[str]:
    # Opened per example: hypothesis runs each example in a trio run of its
    # own, which a function-scoped async fixture would outlive.
    async with trio.open_nursery() as nursery:
        target: str = await nursery.start(boxfiles.serve_files, root, f"unix:{sock_dir}/p.sock")
        yield target
        nursery.cancel_scope.cancel()


def listing(top: Path, *, dir_mtimes: bool = True) -> dict[str, tuple[object, ...]]:
    """Everything at and under ``top``: kind, mode bits, size, content hash
    or link target, mtime in ns (directories' optionally: making staging
    beside something touches its parent's), inode and link count."""
    found: dict[str, tuple[object, ...]] = {}
    paths = [top, *top.rglob("*")]  # rglob does not follow symlinks to dirs
    for path in paths:
        st_ = path.lstat()
        rel = str(path.relative_to(top))
        if stat.S_ISLNK(st_.st_mode):
            found[rel] = ("link", os.readlink(path), st_.st_mtime_ns)
        elif stat.S_ISDIR(st_.st_mode):
            found[rel] = ("dir", oct(stat.S_IMODE(st_.st_mode)))
            if dir_mtimes:
                found[rel] += (st_.st_mtime_ns,)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            mode = oct(stat.S_IMODE(st_.st_mode))
            found[rel] = ("file", mode, st_.st_size, digest, st_.st_mtime_ns)
    return found


def identity(top: Path) -> dict[str, tuple[object, ...]]:
    """listing() plus each non-directory's inode and link count: a hard link
    made to a sentinel file from outside shows as a changed link count.
    (A directory's link count changes with its subdirectories, which the
    listing already shows.)"""
    found = listing(top, dir_mtimes=False)
    for rel, entry in found.items():
        if entry[0] != "dir":
            st_ = (top / rel).lstat()
            found[rel] = (*entry, st_.st_ino, st_.st_nlink)
    return found


# ------------------------------------------------------------ round trips


@dataclass(frozen=True)
class File:
    size: int
    seed: int
    mode: int
    mtime: int


@dataclass(frozen=True)
class Link:
    target: str
    mtime: int


@dataclass(frozen=True)
class Dir:
    children: dict[str, File | Link | Dir]
    mode: int
    mtime: int


Node = File | Link | Dir

# Safe: no "/" or NUL, never "." or "..", never the server's reserved staging
# prefix; but non-ASCII, spaces, dashes and dots inside a name.
names = st.text(alphabet="abzAZ09 _-.éüß日本✓", min_size=1, max_size=12).filter(
    lambda n: n not in (".", "..") and not n.startswith(".boxfiles")
)
mtimes = st.integers(0, 4_102_444_800 * 10**9)  # up to 2100, to the nanosecond
sizes = st.one_of(st.integers(0, 600), st.integers(0, 50 * KiB))
files = st.builds(
    File, sizes, st.integers(0, 2**32), st.sampled_from([0o644, 0o600, 0o755, 0o444, 0o640]), mtimes
)
# Relative targets, dangling or not, pointing up or sideways: stored verbatim.
targets = st.lists(st.one_of(st.just(".."), names), min_size=1, max_size=3).map("/".join)
links = st.builds(Link, targets, mtimes)
dir_modes = st.sampled_from([0o755, 0o700, 0o750, 0o555])
nodes = st.recursive(
    st.one_of(files, links),
    lambda children: st.builds(
        Dir, st.dictionaries(names, children, max_size=4), dir_modes, mtimes
    ),
    max_leaves=12,
)
trees = st.builds(Dir, st.dictionaries(names, nodes, max_size=6), dir_modes, mtimes)


def build(path: Path, node: Node) -> None:
    """Create ``node`` at ``path``; modes and mtimes are set once the
    children exist (writing them changes a directory's mtime)."""
    if isinstance(node, File):
        path.write_bytes(random.Random(node.seed).randbytes(node.size))
        path.chmod(node.mode)
    elif isinstance(node, Link):
        path.symlink_to(node.target)
    else:
        path.mkdir()
        for name, child in node.children.items():
            build(path / name, child)
        path.chmod(node.mode)
    os.utime(path, ns=(node.mtime, node.mtime), follow_symlinks=False)


@SETTINGS
@given(tree=trees)
async def test_copy_in_then_out_is_exact(tree: Dir) -> None:
    with short_socket_dir() as tmp:
        (tmp / "root").mkdir()
        build(tmp / "src", tree)
        expected = listing(tmp / "src")
        async with reference_server(tmp / "root", tmp) as target:
            async with boxfiles.open_client(target) as client:
                with trio.fail_after(PROMPT):
                    await client.copy_in(tmp / "src", "/box/t")
                    await client.copy_out("/box/t", tmp / "out")
        assert listing(tmp / "src") == expected  # the source was only read
        assert listing(tmp / "out") == expected
        assert listing(tmp / "root" / "box" / "t") == expected


# -------------------------------------------------------- hostile archives

SENTINEL = "@S"  # stands for the sentinel directory's absolute path
# Every escape a generated archive could make lands inside the example's temp
# directory (absolute names and targets only ever name the sentinel or its
# parent; at most a few ".." are stacked, below this much padding), so a
# regression shows up as a failed assertion, never as litter on the host.
PADDING = ["p"] * 8

components = st.sampled_from(["..", ".", "", "a", "b", "evil", "x y", "é"])
leaves = st.sampled_from(["a", "b", "evil", "pwned", "x y", "é", "keep"])
# Ordinary names under "d/" (the one top-level entry copy_out expects), so
# that hostile entries come mixed with plain ones and some archives pass.
plain_names = st.tuples(st.lists(st.sampled_from(["a", "b", "é"]), max_size=2), leaves).map(
    lambda t: "/".join(["d", *t[0], t[1]])
)
tricky_names = st.tuples(
    st.sampled_from(["", "d/", "./", f"{SENTINEL}/", f"{SENTINEL}/../"]),
    st.lists(components, max_size=3),
    leaves,
).map(lambda t: t[0] + "/".join([*t[1], t[2]]))
entry_names = st.one_of(
    plain_names,
    tricky_names,
    st.sampled_from(
        ["../sentinel/pwned", "../../sentinel/pwned", "d/../../pwned", f"{SENTINEL}/pwned"]
    ),
)
escaping_targets = st.sampled_from(
    ["..", "../..", "../../..", "../sentinel", "../../sentinel", SENTINEL, f"{SENTINEL}/..", "a"]
)
hardlink_targets = st.sampled_from(
    [f"{SENTINEL}/keep", f"{SENTINEL}/../victim", "../sentinel/keep", "../../victim", "a", "a/b"]
)


@dataclass(frozen=True)
class Entry:
    name: str
    kind: bytes
    linkname: str = ""
    data: bytes = b""


any_entry = st.one_of(
    st.builds(Entry, plain_names, st.just(tarfile.REGTYPE), st.just(""), st.binary(max_size=64)),
    st.builds(Entry, plain_names, st.just(tarfile.DIRTYPE)),
    st.builds(Entry, entry_names, st.just(tarfile.REGTYPE), st.just(""), st.binary(max_size=64)),
    st.builds(Entry, entry_names, st.just(tarfile.DIRTYPE)),
    st.builds(Entry, entry_names, st.just(tarfile.SYMTYPE), escaping_targets),
    st.builds(Entry, entry_names, st.just(tarfile.LNKTYPE), hardlink_targets),
)


@st.composite
def through_a_link(draw: st.DrawFn) -> list[Entry]:
    """A symlink with an escaping target, then entries written through it."""
    link = draw(st.sampled_from(["a", "d/a", "./d/a", "d/b/a"]))
    entries = [Entry(link, tarfile.SYMTYPE, draw(escaping_targets))]
    for leaf in draw(st.lists(st.sampled_from(["pwned", "sub/pwned", "keep"]), min_size=1)):
        kind = draw(st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.LNKTYPE]))
        linkname = draw(hardlink_targets) if kind == tarfile.LNKTYPE else ""
        entries.append(Entry(f"{link}/{leaf}", kind, linkname, b"pwned"))
    return entries


archives = st.lists(
    st.one_of(any_entry.map(lambda e: [e]), through_a_link()), min_size=1, max_size=5
).map(lambda groups: [e for group in groups for e in group])


@dataclass(frozen=True)
class Damage:
    """A corruption of a whole archive; every one must be refused."""

    kind: str
    size: int  # how many bytes it adds, cuts or where it strikes, by kind

    def apply(self, body: bytes) -> bytes:
        """``body`` (members without the end marker), damaged and ended."""
        end = tarshapes.END
        match self.kind:
            case "garbage":  # where the next header or the end should be
                return body + bytes(1 + i % 255 for i in range(self.size))
            case "truncated-end":
                return body + end[: self.size % len(end)]
            case "non-zero-in-end":
                hit = self.size % len(end)
                return body + end[:hit] + b"\x01" + end[hit + 1 :]
            case "non-zero-after-end":
                return body + end + b"\0" * self.size + b"\x01"
            case "bad-checksum":
                later = bytearray(tarshapes.member_bytes("later"))
                later[148 + self.size % 6] ^= 1  # a digit of the checksum
                return body + bytes(later) + end
            case "malformed-pax":
                pax = tarshapes.extension(b"x", b"%d comment=x\n" % (14 + self.size))
                return pax + body + end
            case "oversized-pax":
                record = tarshapes.pax_record("comment", "c" * (64 * KiB + self.size))
                return tarshapes.extension(b"x", record) + body + end
            case "digits-pax":
                record = tarshapes.pax_record("path", "1" * (300 + self.size))
                return tarshapes.extension(b"x", record) + body + end
            case "sparse":
                return body + tarshapes.sparse_member("d/holes") + end
        raise AssertionError(self.kind)


DAMAGE_KINDS = [
    "garbage",
    "truncated-end",
    "non-zero-in-end",
    "non-zero-after-end",
    "bad-checksum",
    "malformed-pax",
    "oversized-pax",
    "digits-pax",
    "sparse",
]
damages = st.one_of(
    st.none(), st.builds(Damage, st.sampled_from(DAMAGE_KINDS), st.integers(0, 5000))
)


def archive(entries: list[Entry], sentinel: Path, damage: Damage | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name.replace(SENTINEL, str(sentinel)))
            info.type = e.kind
            info.linkname = e.linkname.replace(SENTINEL, str(sentinel))
            info.mode = 0o755 if e.kind == tarfile.DIRTYPE else 0o644
            data = e.data if e.kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
        body = out.getvalue()
    return out.getvalue() if damage is None else damage.apply(body)


def make_work(tmp: Path) -> tuple[Path, Path]:
    """tmp/p/.../p/w holding the sentinel directory and a victim file; the
    root or destination goes beside them, so one or two ".." from it (or
    from an entry or link inside it) land on them."""
    work = tmp.joinpath(*PADDING, "w")
    sentinel = work / "sentinel"
    sentinel.mkdir(parents=True)
    (sentinel / "keep").write_bytes(b"keep")
    (work / "victim").write_bytes(b"victim")
    return work, sentinel


def outside(tmp: Path, *inside: Path) -> dict[str, tuple[object, ...]]:
    """identity() of everything under tmp except the trees in ``inside``."""
    skip = [str(p.relative_to(tmp)) for p in inside]
    return {
        rel: v
        for rel, v in identity(tmp).items()
        if not any(rel == s or rel.startswith(s + "/") for s in skip)
    }


@SETTINGS
@given(
    entries=archives,
    dest=st.sampled_from(["/d", "/", "/existing", "/escape", "/up/x"]),
    damage=damages,
)
async def test_hostile_upload_never_writes_outside_the_root(
    entries: list[Entry], dest: str, damage: Damage | None
) -> None:
    with short_socket_dir() as tmp, short_socket_dir() as sock_dir:
        work, sentinel = make_work(tmp)
        root = work / "root"
        (root / "existing").mkdir(parents=True)
        (root / "existing" / "keep").write_bytes(b"k")
        # Links already in the root that point out of it: the server resolves
        # them inside the root, never on the host.
        (root / "escape").symlink_to(sentinel)
        (root / "up").symlink_to("../sentinel")
        (root / "existing" / "up2").symlink_to("../../sentinel")
        before_outside = outside(tmp, root)
        # Directory mtimes aside: staging is made and removed in the root.
        before_inside = listing(root, dir_mtimes=False)
        data = archive(entries, sentinel, damage)
        refused: boxfiles.RemoteError | None = None
        async with reference_server(root, sock_dir) as target:
            async with boxfiles.open_client(target) as client:
                with trio.fail_after(PROMPT):
                    try:
                        await client.upload_tar(BytesReader(data), dest, source_is_dir=True)
                    except boxfiles.RemoteError as exc:
                        refused = exc
        event("refused" if refused else "accepted")  # shown by --hypothesis-show-statistics
        assert outside(tmp, root) == before_outside
        assert refused is not None or damage is None
        if refused is not None:
            assert isinstance(refused, boxfiles.InvalidArgument), refused
            assert listing(root, dir_mtimes=False) == before_inside
        assert not list(root.rglob(".boxfiles-*"))


def serve(data: bytes) -> DownloadScript:
    async def script(call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        await call.recv()
        for i in range(0, max(len(data), 1), 16 * KiB):
            message = DownloadChunk(data=data[i : i + 16 * KiB])
            if i == 0:
                message.source_is_dir = True
            await call.send(message)

    return script


# Links already in the destination, named like archive entries (at its top,
# inside subdirectories, and as the top-level name "d" itself), pointing out
# of it at a directory or a file: placing and merging must replace them,
# never write through them.
link_places = st.sampled_from(["a", "b", "evil", "keep", "d", "d/a", "d/b", "a/b", "é/keep"])
link_targets = st.sampled_from(
    [SENTINEL, f"{SENTINEL}/keep", "../sentinel", "../../w/sentinel", "../victim"]
)
dest_links = st.dictionaries(link_places, link_targets, max_size=4)


def make_links(top: Path, links: dict[str, str], sentinel: Path) -> None:
    """The links at their places, parents made as real directories; a place
    under another link is left out (it would be made through that link)."""
    for place in sorted(links):
        path = top / place
        if any(p.is_symlink() for p in [path, *path.parents] if top in p.parents):
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(links[place].replace(SENTINEL, str(sentinel)))


@SETTINGS
@given(entries=archives, links=dest_links, damage=damages)
# The honest archive of /d meeting a link named d, and links inside a
# directory a merge walks into: always tried, whatever else is generated.
@example(
    entries=[
        Entry("d", tarfile.DIRTYPE),
        Entry("d/a", tarfile.DIRTYPE),
        Entry("d/a/b", tarfile.REGTYPE),
    ],
    links={"d": SENTINEL, "a/b": f"{SENTINEL}/keep", "d/a": "../sentinel"},
    damage=None,
)
async def test_hostile_download_never_writes_outside_dest(
    entries: list[Entry], links: dict[str, str], damage: Damage | None
) -> None:
    with short_socket_dir() as tmp, short_socket_dir() as sock_dir:
        work, sentinel = make_work(tmp)
        # "/d/." merges into existing; "/d" lands in named as named/d.
        existing, named = work / "existing", work / "named"
        for top in (existing, named):
            top.mkdir()
            make_links(top, links, sentinel)
        out = work / "out"
        before_outside = outside(tmp, existing, named)
        before = {top: listing(top) for top in (existing, named)}
        data = archive(entries, sentinel, damage)
        errors = (boxfiles.UnsafeArchive, boxfiles.LocalIOError, boxfiles.IncompleteTransfer)
        async with scripted_server(sock_dir, download=serve(data)) as srv:
            async with boxfiles.open_client(srv.target) as client:
                with trio.fail_after(PROMPT):
                    try:
                        await client.copy_out("/d", out)
                        placed = True
                    except errors:
                        placed = False
                    changed = {}
                    for src, top in (("/d/.", existing), ("/d", named)):
                        try:
                            await client.copy_out(src, top)
                            changed[top] = True
                        except errors:
                            changed[top] = False
        event(f"new: {'placed' if placed else 'refused'}")
        event(f"merge: {'merged' if changed[existing] else 'refused'}")
        event(f"into: {'placed' if changed[named] else 'refused'}")
        # Only dest itself may have appeared beside the sentinel: no staging
        # left, nothing written through a link.
        assert outside(tmp, existing, named, out) == before_outside
        assert not (damage is not None and (placed or any(changed.values())))
        # lexists: what was placed may be a symlink, dangling from out's place.
        assert os.path.lexists(out) == placed
        assert not list(work.rglob(".boxfiles-*"))
        for top in (existing, named):
            if not changed[top]:  # exactly as it was, directory times included
                assert listing(top) == before[top]

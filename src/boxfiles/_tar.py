"""Tar packing and extraction for the reference server (blocking; run in threads)."""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, final

import trio

from ._errors import InvalidArgument, NotFound


@final
class ChannelWriter:
    """A blocking file-like sink, used from a worker thread, that hands
    ``chunk_size`` pieces to a trio memory channel (so packing waits while the
    network is slow instead of buffering)."""

    def __init__(self, channel: trio.MemorySendChannel[bytes], chunk_size: int) -> None:
        self._channel = channel
        self._chunk_size = chunk_size
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        while len(self._buffer) >= self._chunk_size:
            piece = bytes(self._buffer[: self._chunk_size])
            del self._buffer[: self._chunk_size]
            trio.from_thread.run(self._channel.send, piece)
        return len(data)

    def flush(self) -> None:
        if self._buffer:
            trio.from_thread.run(self._channel.send, bytes(self._buffer))
            self._buffer.clear()


@final
@dataclass(frozen=True)
class PackPlan:
    path: Path
    arcname: str
    source_is_dir: bool
    follow_symlinks: bool


def _inside(root: Path, remote: str) -> Path:
    # Resolve as if root were "/": strip leading slashes, then check the real
    # path stays under root.
    candidate = root / remote.lstrip("/")
    real = Path(os.path.realpath(candidate))
    if real != root and root not in real.parents:
        raise NotFound(f"path escapes the container root: {remote}")
    return candidate


def plan_pack(root: Path, src_path: str, *, include_parent: bool, follow_symlinks: bool) -> PackPlan:
    contents = src_path.endswith("/.")
    path = _inside(root, src_path[:-2] if contents else src_path)
    st = os.stat(path) if follow_symlinks else os.lstat(path)
    is_dir = tarfile.stat.S_ISDIR(st.st_mode)  # type: ignore[attr-defined]
    if is_dir and (contents or not include_parent):
        arcname = "."
    else:
        arcname = path.name or "."
    return PackPlan(path, arcname, is_dir, follow_symlinks)


def pack(plan: PackPlan, out: ChannelWriter) -> None:
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, dereference=plan.follow_symlinks) as tar:  # type: ignore[call-overload]
        tar.add(plan.path, arcname=plan.arcname)
    out.flush()


def extract_archive(
    archive: Path,
    scratch: Path,
    root: Path,
    dest_path: str,
    *,
    source_is_dir: bool | None,
    mkdir_parents: bool,
    overwrite: bool,
) -> None:
    """Extract ``archive`` at ``dest_path`` under ``root``, docker-cp style."""
    try:
        with tarfile.open(archive, mode="r:") as tar:
            members = tar.getmembers()
            tar.extractall(scratch, filter="data")
    except (tarfile.TarError, EOFError) as err:
        raise InvalidArgument(f"corrupt archive: {err}") from err
    except tarfile.FilterError as err:
        raise InvalidArgument(f"unsafe archive entry: {err}") from err
    dest = _inside(root, dest_path)
    single_file = (
        len(members) == 1 and members[0].isfile() and source_is_dir is not True
    )
    if single_file and not dest_path.endswith("/") and not dest.is_dir():
        _place_file(scratch / members[0].name, dest, mkdir_parents, overwrite)
        return
    if not dest.exists():
        if not mkdir_parents and not dest.parent.is_dir():
            raise NotFound(f"parent directory does not exist: {dest.parent.relative_to(root)}")
        dest.mkdir(parents=True)
    _merge(scratch, dest, overwrite)


def _place_file(src: Path, dest: Path, mkdir_parents: bool, overwrite: bool) -> None:
    if not dest.parent.exists():
        if not mkdir_parents:
            raise NotFound(f"parent directory does not exist: {dest.parent}")
        dest.parent.mkdir(parents=True)
    if dest.exists() and not overwrite:
        raise _exists(dest)
    os.replace(src, dest)


def _exists(path: Path) -> Exception:
    from ._errors import AlreadyExists

    return AlreadyExists(f"already exists: {path}")


def _merge(src: Path, dest: Path, overwrite: bool) -> None:
    for entry in sorted(src.iterdir()):
        target = dest / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if target.is_dir() and not target.is_symlink():
                _merge(entry, target, overwrite)
                continue
        if target.exists() or target.is_symlink():
            if not overwrite:
                raise _exists(target)
            if target.is_dir() and not target.is_symlink():
                import shutil

                shutil.rmtree(target)
        os.replace(entry, target)


__all__ = ["ChannelWriter", "IO", "PackPlan", "extract_archive", "pack", "plan_pack"]

"""`nox -s bench`: boxfiles against plain asyncio grpclib, grpcio and raw sockets.

Every server and every client is its own process (tests/bench/peers.py), so
RSS is per process: a client reports its peak above its own idle baseline; the
server's peak is reset (/proc/PID/clear_refs) before each run and read after.
Rows of one configuration are interleaved (A B C A B C ...) so drift in the
machine hits all of them alike. Ratios are to the plain asyncio grpclib client
in the same configuration of the same invocation.

    python tests/bench/run.py [--size 1G] [--rounds 3] [--out bench-results]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEERS = str(HERE / "peers.py")
MiB = 1024 * 1024
BASELINE = "grpclib"  # the plain asyncio grpclib client: every ratio is to it
CLIENT_TIMEOUT = 600.0  # seconds; a stuck run fails the bench rather than hanging it
READY_TIMEOUT = 30.0

LIVE: list[subprocess.Popen[bytes]] = []  # every child, killed on the way out


def _die_with_parent() -> None:
    """In each child: SIGKILL it if the bench dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds through every finally, so children are reaped.
    raise SystemExit(128 + signum)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)I?B?", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (say 256M or 1G)")
    return int(m.group(1)) * {"": 1, "K": 1024, "M": MiB, "G": 1024 * MiB}[m.group(2)]


def human(n: int) -> str:
    for unit, scale in (("GiB", 1024 * MiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


# --- data ---------------------------------------------------------------------------


@dataclass
class Data:
    payload: Path  # random bytes: what the sources stream and the tar holds
    tar: Path  # a one-file tar of payload, named payload.bin
    tree: Path  # a directory holding payload.bin (for copy_in)
    root: Path  # the reference server's container root, holding payload.bin
    scale: Path  # 64 MiB tar for the concurrency test
    small: Path  # parent of small/: 10,000 files of 1 KiB


def _write_random(path: Path, size: int) -> None:
    # 16 MiB of urandom repeated: incompressible enough, quick to make.
    block = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.link(src, dst)


def prepare(data_dir: Path, work: Path, size: int) -> Data:
    """Make the data files once (kept across runs) and warm the page cache."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tag = human(size)
    payload = data_dir / f"payload-{tag}.bin"
    if not payload.exists() or payload.stat().st_size != size:
        print(f"generating {payload} ...", flush=True)
        _write_random(payload, size)
    tar = data_dir / f"upload-{tag}.tar"
    if not tar.exists():
        with tarfile.open(str(tar) + ".tmp", "w", format=tarfile.PAX_FORMAT) as t:
            t.add(payload, arcname="payload.bin")
        os.replace(str(tar) + ".tmp", tar)
    scale = data_dir / "scale-64MiB.tar"
    if not scale.exists():
        part = data_dir / "scale-64MiB.bin"
        _write_random(part, 64 * MiB)
        with tarfile.open(str(scale) + ".tmp", "w") as t:
            t.add(part, arcname="scale.bin")
        os.replace(str(scale) + ".tmp", scale)
        part.unlink()
    small = data_dir / "smalltree"
    if not (small / "small" / "f9999").exists():
        (small / "small").mkdir(parents=True, exist_ok=True)
        chunk = os.urandom(1024)
        for i in range(10_000):
            sub = small / "small" / f"d{i // 100:02d}"
            sub.mkdir(exist_ok=True)
            (sub / f"f{i:04d}").write_bytes(chunk)
        (small / "small" / "f9999").write_bytes(chunk)  # marker: tree complete
    tree = work / "tree"
    _link(payload, tree / "payload.bin")
    root = work / "root"
    _link(payload, root / "payload.bin")
    for path in (payload, tar, scale):  # page cache warm for every row alike
        with open(path, "rb", buffering=0) as f:
            while f.read(16 * MiB):
                pass
    return Data(payload, tar, tree, root, scale, small)


# --- host-backed memory ---------------------------------------------------------------

#: Free page reporting (virtio-balloon, on VMs such as this project's) hands the
#: memory a guest frees back to the host; the next write to each such page then
#: costs a fault on the host as well, charged to whichever process touches it
#: first. A server writing 512 MiB of new page cache spent about 2 s of system CPU
#: instead of 0.4 s when it drew reported pages: a toss-up between rows that
#: swamps what the bench compares. The setting below stops reporting
#: for the bench's run; ``--keep-page-reporting`` leaves it alone.
PAGE_REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
PAGE = mmap.PAGESIZE


def _warm(nbytes: int) -> None:
    """Fault in ``nbytes`` of anonymous memory and free it again, so that the
    free pages the rows draw on are backed by the host before any row runs."""
    block = b"\1" * (16 * MiB)
    with mmap.mmap(-1, nbytes) as m:
        for offset in range(0, nbytes, len(block)):
            m[offset : offset + len(block)] = block[: nbytes - offset]


@contextlib.contextmanager
def host_backed_memory(warm_bytes: int, keep: bool) -> Iterator[str]:
    """Free page reporting off (restored on the way out) and ``warm_bytes``
    of free memory faulted in; yields what was done, for the results."""
    if keep or not PAGE_REPORTING_ORDER.exists():
        yield "free page reporting: left as it is"
        return
    old = PAGE_REPORTING_ORDER.read_text().strip()
    # Blocks of a higher order than the largest the kernel has are never
    # reported; the kernel takes values up to one past it.
    for order in range(16, int(old), -1):
        try:
            PAGE_REPORTING_ORDER.write_text(str(order))
            break
        except OSError:  # EINVAL past the kernel's limit; EACCES without root
            continue
    else:
        yield f"free page reporting: left at order {old} (no higher order accepted)"
        return
    try:
        warm = min(warm_bytes, _kib("/proc/meminfo", "MemAvailable") * 1024 // 2) // PAGE * PAGE
        started = time.monotonic()
        _warm(warm)
        note = (
            f"free page reporting: off for the run (order {old} -> {order}, restored after); "
            f"{warm // MiB} MiB of free memory faulted in ({time.monotonic() - started:.1f}s)"
        )
        yield note
    finally:
        PAGE_REPORTING_ORDER.write_text(old)


# --- processes -----------------------------------------------------------------------


def _kib(path: str, field_name: str) -> int:
    """A "Name:  N kB" field of /proc/meminfo or /proc/<pid>/status, in KiB."""
    with open(path) as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


@dataclass
class Server:
    kind: str
    proc: subprocess.Popen[bytes]
    target: str

    def reset_peak(self) -> int:
        """Reset the server's peak RSS to its current RSS; return that, KiB."""
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")
        return _kib(f"/proc/{self.proc.pid}/status", "VmRSS")

    def peak(self) -> int:
        return _kib(f"/proc/{self.proc.pid}/status", "VmHWM")

    def cpu_seconds(self) -> float:
        """User plus system CPU of the server, all its threads, so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def read_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        # Byte by byte with select: a blocking readline could hang the bench.
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"{self.kind} server said nothing for {timeout}s")
            byte = os.read(self.proc.stdout.fileno(), 1)
            if not byte:
                raise RuntimeError(f"{self.kind} server exited ({self.proc.poll()})")
            line += byte
        return line.decode().strip()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc in LIVE:
        LIVE.remove(proc)


@contextlib.contextmanager
def server(
    kind: str, listen: str, root: Path, log: Path, env: dict[str, str] | None = None
) -> Iterator[Server]:
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, PEERS, "server", kind, "--listen", listen, "--root", str(root)],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            preexec_fn=_die_with_parent,
        )
    LIVE.append(proc)
    try:
        srv = Server(kind, proc, "")
        line = srv.read_line(READY_TIMEOUT)
        if not line.startswith("READY "):
            raise RuntimeError(f"{kind} server: unexpected {line!r}")
        srv.target = line.split(" ", 1)[1]
        yield srv
    finally:
        _stop(proc)


def run_client(
    args: list[str], log: Path, stdin: Any = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, PEERS, "client", *args],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=stdin,
            env=env,
            preexec_fn=_die_with_parent,
        )
    LIVE.append(proc)
    try:
        out, _ = proc.communicate(timeout=CLIENT_TIMEOUT)
    finally:
        _stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"client {args[:2]} failed ({proc.returncode}); see {log}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


# --- the main table ------------------------------------------------------------------


@dataclass
class Row:
    label: str  # e.g. "boxfiles upload_tar"
    kind: str  # peers.py client kind
    op: str


@dataclass
class Config:
    name: str  # e.g. "upload -> grpcio sink, unix"
    direction: str
    server: str
    transport: str
    rows: list[Row]
    runs: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""
    chunk: int = MiB  # data bytes per message, for every row and the server

    @property
    def env(self) -> dict[str, str] | None:
        return None if self.chunk == MiB else {**os.environ, "BENCH_CHUNK": str(self.chunk)}


def has_copy() -> tuple[bool, str]:
    import boxfiles

    ok = hasattr(boxfiles.FilesClient, "copy_in") and hasattr(boxfiles.FilesClient, "copy_out")
    return ok, "" if ok else "FilesClient has no copy_in/copy_out yet: copy rows skipped"


def configs(copy: bool) -> list[Config]:
    up = [
        Row("boxfiles upload_tar", "boxfiles", "upload"),
        Row("grpclib (asyncio)", "grpclib", "upload"),
        Row("grpcio (aio)", "grpcio", "upload"),
    ]
    down = [
        Row("boxfiles download_tar", "boxfiles", "download"),
        Row("grpclib (asyncio)", "grpclib", "download"),
        Row("grpcio (aio)", "grpcio", "download"),
    ]
    # A sender with next to no cost of its own (HTTP/2 frames written by
    # hand): how fast the receiver takes messages at all.
    ceiling = Row("h2 by hand (sink ceiling)", "h2", "upload")
    out: list[Config] = []
    for transport in ("unix", "tcp"):
        servers = ("grpcio", "grpclib", "boxfiles") if transport == "unix" else ("grpcio",)
        for direction, rows in (("upload", up), ("download", down)):
            for srv in servers:
                extra: list[Row] = []
                if copy and transport == "unix" and direction == "upload" and srv != "grpclib":
                    extra = [Row("boxfiles copy_in (tree)", "boxfiles", "copy_in")]
                if transport == "unix" and direction == "upload" and srv == "boxfiles":
                    extra.append(ceiling)
                if copy and transport == "unix" and direction == "download" and srv == "boxfiles":
                    extra = [Row("boxfiles copy_out (tree)", "boxfiles", "copy_out")]
                what = {"grpcio": "grpcio", "grpclib": "grpclib", "boxfiles": "boxfiles ref"}[srv]
                role = (
                    ("sink" if direction == "upload" else "source")
                    if srv != "boxfiles"
                    else "server"
                )
                out.append(
                    Config(
                        f"{direction} {'->' if direction == 'upload' else '<-'} {what} {role}, {transport}",
                        direction,
                        srv,
                        transport,
                        [*rows, *extra],
                    )
                )
    # Small messages, where per-message overhead dominates: against the
    # receiver (upload) and the sender (download) that costs least per
    # message. Uploads also get the hand-written sender.
    for direction, rows in (("upload", [*up, ceiling]), ("download", down)):
        role = "sink" if direction == "upload" else "source"
        arrow = "->" if direction == "upload" else "<-"
        out.append(
            Config(
                f"{direction} {arrow} grpcio {role}, unix, 64 KiB chunks",
                direction,
                "grpcio",
                "unix",
                list(rows),
                chunk=64 * 1024,
            )
        )
    # The reference server's own cost per message, which the sinks above
    # do not show.
    out.append(
        Config(
            "upload -> boxfiles ref server, unix, 64 KiB chunks",
            "upload",
            "boxfiles",
            "unix",
            [*up, ceiling],
            chunk=64 * 1024,
        )
    )
    for direction in ("upload", "download"):
        out.append(
            Config(
                f"{direction} raw bytes (ceiling), unix",
                direction,
                "raw",
                "unix",
                [Row("raw socket", "raw", direction)],
            )
        )
    return out


def run_config(
    cfg: Config, data: Data, work: Path, sock_dir: Path, rounds: int, logs: Path
) -> None:
    # A fresh socket name per configuration: not every server unlinks a stale one.
    listen = (
        f"unix:{sock_dir}/{id(cfg)}-{cfg.server}.sock" if cfg.transport == "unix" else "127.0.0.1:0"
    )

    def client_args(row: Row, target: str, dest: Path) -> list[str]:
        args = [row.kind, row.op, "--target", target]
        if row.op == "upload":
            return [*args, "--file", str(data.tar)]
        if row.op == "copy_in":
            return [*args, "--file", str(data.tree), "--src", "/copied"]
        if row.op == "copy_out":
            return [*args, "--file", str(dest), "--src", "/payload.bin"]
        src = "/payload.bin" if cfg.server == "boxfiles" else str(data.payload)
        return [*args, "--file", str(dest), "--src", src]

    with server(cfg.server, listen, data.root, logs / f"server-{cfg.server}.log", cfg.env) as srv:
        # A fresh server's first transfer pays for its start (threads, pools,
        # first reads): one untimed transfer first, so that no row (the first
        # of round 0) pays for it.
        dest = work / "warm-up"
        run_client(client_args(cfg.rows[0], srv.target, dest), logs / "warm-up.log", env=cfg.env)
        _remove(dest)
        for rnd in range(rounds):
            for row in cfg.rows:
                dest = work / f"dl-{row.kind}-{row.op}"
                args = client_args(row, srv.target, dest)
                # The reference server writes what it receives to disk: start
                # every run with no dirty pages left by the one before, so no
                # row pays for another's writeback.
                os.sync()
                base = srv.reset_peak()
                cpu = srv.cpu_seconds()
                result = run_client(args, logs / f"client-{row.kind}.log", env=cfg.env)
                result.update(
                    config=cfg.name,
                    row=row.label,
                    round=rnd,
                    server_rss_base_kib=base,
                    server_rss_delta_kib=srv.peak() - base,
                    server_cpu_seconds=srv.cpu_seconds() - cpu,
                    mb_s=result["bytes"] / result["seconds"] / 1e6,
                )
                cfg.runs.append(result)
                print(
                    f"  {cfg.name:44} {row.label:26} round {rnd}: {result['mb_s']:8.1f} MB/s",
                    flush=True,
                )
                _remove(dest)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def summarize(cfgs: list[Config]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for cfg in cfgs:
        base_runs = [r["mb_s"] for r in cfg.runs if r["row"].startswith(BASELINE)]
        base = statistics.median(base_runs) if base_runs else None
        for row in cfg.rows:
            runs = [r for r in cfg.runs if r["row"] == row.label]
            if not runs:
                continue
            rates = [r["mb_s"] for r in runs]
            med = statistics.median(rates)
            out.append(
                {
                    "config": cfg.name,
                    "row": row.label,
                    "rounds": len(runs),
                    "mb_s_median": med,
                    "mb_s_min": min(rates),
                    "mb_s_max": max(rates),
                    "ratio_to_grpclib": med / base if base else None,
                    "client_cpu_s_per_gib": statistics.median(
                        r["cpu_seconds"] / r["bytes"] * 2**30 for r in runs
                    ),
                    "client_minor_faults_per_gib": statistics.median(
                        r["minor_faults"] / r["bytes"] * 2**30 for r in runs
                    ),
                    "server_cpu_s_per_gib": statistics.median(
                        r["server_cpu_seconds"] / r["bytes"] * 2**30 for r in runs
                    ),
                    "client_rss_delta_mib_max": max(r["rss_delta_kib"] for r in runs) / 1024,
                    "server_rss_delta_mib_max": max(r["server_rss_delta_kib"] for r in runs) / 1024,
                }
            )
    return out


def print_table(summary: list[dict[str, Any]]) -> None:
    head = (
        f"{'configuration':44} {'client':26} {'MB/s med':>9} {'min-max':>15} {'x grpclib':>9} "
        f"{'cli CPU':>8} {'faults':>7} {'srv CPU':>8} {'cli dRSS':>9} {'srv dRSS':>9}"
    )
    print(head)
    print("-" * len(head))
    last = ""
    for s in summary:
        name = s["config"] if s["config"] != last else ""
        last = s["config"]
        ratio = f"{s['ratio_to_grpclib']:.2f}x" if s["ratio_to_grpclib"] else "-"
        print(
            f"{name:44} {s['row']:26} {s['mb_s_median']:9.0f} "
            f"{s['mb_s_min']:7.0f}-{s['mb_s_max']:<7.0f} {ratio:>9} "
            f"{s['client_cpu_s_per_gib']:7.2f}s {s['client_minor_faults_per_gib'] / 1000:6.0f}k "
            f"{s['server_cpu_s_per_gib']:7.2f}s "
            f"{s['client_rss_delta_mib_max']:7.1f}Mi {s['server_rss_delta_mib_max']:7.1f}Mi"
        )
    print(
        "(MB = 10^6 bytes. cli CPU = client CPU seconds per GiB and faults = its minor page faults\n"
        " per GiB, medians: on a small machine the receiver often caps MB/s, so CPU shows the\n"
        " client's own cost. srv CPU = the server's CPU seconds per GiB, all threads, median: a\n"
        " one-threaded server whose srv CPU is about the transfer's own seconds per GiB\n"
        " (1074 / MB/s) was busy throughout and set the pace. dRSS = peak RSS above the\n"
        " process's idle baseline, max over rounds.)"
    )


def chart(summary: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{s['config']}  |  {s['row']}" for s in summary]
    med = [s["mb_s_median"] for s in summary]
    lo = [s["mb_s_median"] - s["mb_s_min"] for s in summary]
    hi = [s["mb_s_max"] - s["mb_s_median"] for s in summary]
    palette = {
        "boxfiles": "tab:blue",
        "grpclib": "tab:orange",
        "grpcio": "tab:green",
        "raw": "tab:gray",
    }
    colors = [palette.get(s["row"].split()[0], "tab:purple") for s in summary]
    fig, ax = plt.subplots(figsize=(12, 0.32 * len(summary) + 1.5))
    y = list(range(len(summary)))[::-1]
    ax.barh(y, med, xerr=[lo, hi], color=colors, capsize=2)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("MB/s (median, whiskers min-max)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long labels must not be clipped
    plt.close(fig)


# --- promptness, scale, many small files ----------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def promptness(sock_dir: Path, root: Path, logs: Path, trials: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for op, kind, word in (("reject", "reject", "REJECT"), ("cancel", "watch", "RESET")):
        with server(kind, f"unix:{sock_dir}/{kind}.sock", root, logs / f"server-{kind}.log") as srv:
            result = run_client(
                ["prompt", op, "--target", srv.target, "--trials", str(trials)],
                logs / "client-prompt.log",
            )
            server_times = []
            for _ in range(trials):
                line = srv.read_line(10)
                if not line.startswith(word):
                    raise RuntimeError(f"{kind} server: unexpected {line!r}")
                server_times.append(float(line.split()[1]))
        if op == "reject":  # server rejected -> client call returned
            lat = [c - s for s, c in zip(server_times, result["times"], strict=True)]
        else:  # client cancelled -> server saw the reset
            lat = [s - c for s, c in zip(server_times, result["times"], strict=True)]
        ms = [x * 1000 for x in lat]
        out[op] = {
            "trials": trials,
            "p50_ms": pct(ms, 0.5),
            "p99_ms": pct(ms, 0.99),
            "max_ms": max(ms),
            "all_ms": ms,
        }
        print(
            f"promptness {op:6}: p50 {out[op]['p50_ms']:.2f} ms  p99 {out[op]['p99_ms']:.2f} ms  (n={trials})",
            flush=True,
        )
    return out


def scale(data: Data, sock_dir: Path, root: Path, logs: Path, rounds: int) -> dict[str, Any]:
    runs: dict[int, list[dict[str, Any]]] = {1: [], 32: []}
    with server("grpcio", f"unix:{sock_dir}/scale.sock", root, logs / "server-grpcio.log") as srv:
        for _ in range(rounds):
            for streams in (1, 32):
                r = run_client(
                    [
                        "scale",
                        "upload",
                        "--target",
                        srv.target,
                        "--file",
                        str(data.scale),
                        "--streams",
                        str(streams),
                    ],
                    logs / "client-scale.log",
                )
                r["mb_s"] = r["bytes"] / r["seconds"] / 1e6
                runs[streams].append(r)
    out: dict[str, Any] = {}
    for streams, rs in runs.items():
        rates = [r["mb_s"] for r in rs]
        out[str(streams)] = {
            "mb_s_median": statistics.median(rates),
            "mb_s_min": min(rates),
            "mb_s_max": max(rates),
            "client_rss_delta_mib_max": max(r["rss_delta_kib"] for r in rs) / 1024,
        }
    out["ratio_32_to_1"] = out["32"]["mb_s_median"] / out["1"]["mb_s_median"]
    print(
        f"scale (boxfiles, 64MiB each -> grpcio sink): 1 stream {out['1']['mb_s_median']:.0f} MB/s "
        f"(dRSS {out['1']['client_rss_delta_mib_max']:.1f} MiB); 32 streams {out['32']['mb_s_median']:.0f} MB/s aggregate "
        f"(dRSS {out['32']['client_rss_delta_mib_max']:.1f} MiB); ratio {out['ratio_32_to_1']:.2f}x",
        flush=True,
    )
    return out


def flatness(
    data: Data, data_dir: Path, sock_dir: Path, logs: Path, size: int, rounds: int
) -> dict[str, Any]:
    """Client RSS of one upload of ``size`` and of four times as much: flat
    memory means the second is no larger."""
    big = data_dir / f"payload-{human(4 * size)}.bin"
    if not big.exists() or big.stat().st_size != 4 * size:
        print(f"generating {big} ...", flush=True)
        _write_random(big, 4 * size)
    with open(big, "rb", buffering=0) as f:  # page cache warm, as for the others
        while f.read(16 * MiB):
            pass
    peaks: dict[int, list[float]] = {size: [], 4 * size: []}
    with server(
        "grpcio", f"unix:{sock_dir}/flat.sock", data.root, logs / "server-grpcio.log"
    ) as srv:
        for _ in range(rounds):
            for n, path in ((size, data.payload), (4 * size, big)):
                r = run_client(
                    ["boxfiles", "upload", "--target", srv.target, "--file", str(path)],
                    logs / "client-boxfiles.log",
                )
                peaks[n].append(r["rss_delta_kib"] / 1024)
    out: dict[str, Any] = {
        human(n): {"client_rss_delta_mib_max": max(v), "client_rss_delta_mib_min": min(v)}
        for n, v in peaks.items()
    }
    out["growth_mib"] = max(peaks[4 * size]) - max(peaks[size])
    print(
        f"flat (boxfiles upload -> grpcio sink): dRSS {human(size)} {max(peaks[size]):.1f} MiB, "
        f"{human(4 * size)} {max(peaks[4 * size]):.1f} MiB (max over rounds); "
        f"growth {out['growth_mib']:+.1f} MiB",
        flush=True,
    )
    return out


def small_files(
    data: Data, sock_dir: Path, root: Path, logs: Path, rounds: int, copy: bool
) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"tar | grpclib": [], "boxfiles copy_in": []}
    with server(
        "boxfiles", f"unix:{sock_dir}/small.sock", root, logs / "server-boxfiles.log"
    ) as srv:
        for _ in range(rounds):
            os.sync()  # as in run_config: no row pays for another's writeback
            tar = subprocess.Popen(
                ["tar", "cf", "-", "-C", str(data.small), "small"],
                stdout=subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
            LIVE.append(tar)
            try:
                r = run_client(
                    ["grpclib", "stdin", "--target", srv.target],
                    logs / "client-grpclib.log",
                    stdin=tar.stdout,
                )
            finally:
                assert tar.stdout is not None
                tar.stdout.close()
                _stop(tar)
            rates["tar | grpclib"].append(10_000 / r["seconds"])
            if copy:
                os.sync()
                r = run_client(
                    [
                        "boxfiles",
                        "copy_in",
                        "--target",
                        srv.target,
                        "--file",
                        str(data.small / "small"),
                        "--src",
                        "/small-copy",
                    ],
                    logs / "client-boxfiles.log",
                )
                rates["boxfiles copy_in"].append(10_000 / r["seconds"])
    out: dict[str, Any] = {
        k: {"files_s_median": statistics.median(v), "files_s_min": min(v), "files_s_max": max(v)}
        for k, v in rates.items()
        if v
    }
    for k, v in out.items():
        print(
            f"small files (10,000 x 1 KiB -> boxfiles ref server): {k:18} {v['files_s_median']:8.0f} files/s",
            flush=True,
        )
    if not copy:
        print("small files: copy_in row skipped (FilesClient has no copy_in yet)", flush=True)
    return out


# --- main ------------------------------------------------------------------------------


def _row(summary: list[dict[str, Any]], config: str, row: str) -> dict[str, Any] | None:
    for s in summary:
        if s["config"] == config and s["row"].startswith(row):
            return s
    return None


def _ceilings(
    summary: list[dict[str, Any]], check: Callable[[str, float, bool | None], None]
) -> None:
    """What the hand-written sender got, for the rows a target judges by
    MB/s where the receiver may set the pace: the most any sender gets."""
    for config in (
        "upload -> boxfiles ref server, unix",
        "upload -> grpcio sink, unix, 64 KiB chunks",
    ):
        h2 = _row(summary, config, "h2 by hand")
        if h2 is not None and h2["ratio_to_grpclib"] is not None:
            check(f"{config}: h2 by hand (the receiver's ceiling)", h2["ratio_to_grpclib"], None)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance issue's targets (#17), checked against this run: every
    ratio is between rows of the same run."""
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float, ok: bool | None) -> None:
        checks.append({"target": name, "value": value, "pass": ok})

    summary = result.get("summary", [])
    # Where the client sets the pace: C-core speed.
    for config in ("download <- grpcio source, unix", "download <- boxfiles ref server, unix"):
        box, aio = _row(summary, config, "boxfiles"), _row(summary, config, "grpcio")
        if box is not None and aio is not None:
            ratio = box["mb_s_median"] / aio["mb_s_median"]
            check(f"{config}: boxfiles >= 1.0x grpcio aio", ratio, ratio >= 1.0)
    # Where the receiver sets the pace: judged by what the client spends.
    for config in ("upload -> grpcio sink, unix", "upload -> grpclib sink, unix"):
        box, lib = _row(summary, config, "boxfiles"), _row(summary, config, BASELINE)
        if box is not None and lib is not None:
            cpu = box["client_cpu_s_per_gib"] / lib["client_cpu_s_per_gib"]
            check(f"{config}: boxfiles client CPU <= 0.7x grpclib's", cpu, cpu <= 0.7)
            ratio = box["ratio_to_grpclib"]
            check(f"{config}: boxfiles >= 0.95x grpclib", ratio, ratio >= 0.95)
    box = _row(summary, "upload -> boxfiles ref server, unix", "boxfiles")
    if box is not None and box["ratio_to_grpclib"] is not None:
        ratio = box["ratio_to_grpclib"]
        check("upload -> boxfiles ref server, unix: boxfiles >= 1.2x grpclib", ratio, ratio >= 1.2)
    ref = _row(summary, "upload -> boxfiles ref server, unix", BASELINE)
    sink = _row(summary, "upload -> grpclib sink, unix", BASELINE)
    if ref is not None and sink is not None:
        ratio = ref["mb_s_median"] / sink["mb_s_median"]
        check(
            "ref server upload+extract >= 0.8x grpclib sink (grpclib client)", ratio, ratio >= 0.8
        )
    for config in (
        "upload -> grpcio sink, unix, 64 KiB chunks",
        "download <- grpcio source, unix, 64 KiB chunks",
    ):
        box = _row(summary, config, "boxfiles")
        if box is not None and box["ratio_to_grpclib"] is not None:
            ratio = box["ratio_to_grpclib"]
            check(f"{config}: boxfiles >= 1.3x grpclib", ratio, ratio >= 1.3)
    _ceilings(summary, check)
    shares = []
    for direction, config in (
        ("upload", "upload -> grpcio sink, unix"),
        ("download", "download <- grpcio source, unix"),
    ):
        box = _row(summary, config, "boxfiles")
        raw = _row(summary, f"{direction} raw bytes (ceiling), unix", "raw")
        if box is not None and raw is not None:
            shares.append(box["mb_s_median"] / raw["mb_s_median"])
    if shares:
        best = max(shares)
        check("end to end >= 40% of the raw socket, best direction", best, best >= 0.4)
    box = _row(summary, "upload -> grpcio sink, unix", "boxfiles")
    if box is not None:
        mib = box["client_rss_delta_mib_max"]
        check(
            "boxfiles upload client dRSS <= 8 MiB",
            mib,
            mib <= 8 if result["size"] >= 2**30 else None,
        )
    ref_box = _row(summary, "upload -> boxfiles ref server, unix", "boxfiles")
    if ref_box is not None:
        mib = max(
            s["server_rss_delta_mib_max"]
            for s in summary
            if s["config"].startswith("upload -> boxfiles ref server")
        )
        check("ref server dRSS <= 32 MiB while receiving", mib, mib <= 32)
    for op, value in result.get("promptness", {}).items():
        check(f"promptness {op}: p50 < 20 ms", value["p50_ms"], value["p50_ms"] < 20)
        check(
            f"promptness {op}: p99 (informational)",
            value["p99_ms"],
            None,
        )
    scale_result = result.get("scale")
    if scale_result:
        ratio = scale_result["ratio_32_to_1"]
        check("scale: 32 streams aggregate >= 1.0x single", ratio, ratio >= 1.0)
        mib = scale_result["32"]["client_rss_delta_mib_max"]
        check("scale: 32-stream client dRSS <= 192 MiB", mib, mib <= 32 * 6)
    flat = result.get("flat")
    if flat:
        growth = flat["growth_mib"]
        check(
            "flat: 4x upload client dRSS within 1 MiB of 1x",
            growth,
            growth <= 1 if result["size"] >= 2**30 else None,
        )
    small = result.get("small_files", {})
    if "boxfiles copy_in" in small:
        ratio = (
            small["boxfiles copy_in"]["files_s_median"] / small["tar | grpclib"]["files_s_median"]
        )
        check("small files: copy_in >= 0.8x tar | grpclib", ratio, ratio >= 0.8)
    print("\ntargets (#17):")
    for c in checks:
        mark = {True: "PASS", False: "MISS", None: "info"}[c["pass"]]
        print(f"  {mark}  {c['target']}: {c['value']:.2f}")
    return checks


def _git() -> str:
    """HEAD, plus "+dirty" when src/ differs from it: which code was measured."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import grpc
    import grpclib

    import boxfiles

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "grpclib": grpclib.__version__,
        "boxfiles": boxfiles.__version__,
        "boxfiles_from": os.path.dirname(boxfiles.__file__),
        "git": _git(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", type=parse_size, default=1024 * MiB, help="transfer size (default 1G)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where generated data is kept (default OUT/data)",
    )
    parser.add_argument("--trials", type=int, default=50, help="promptness trials (default 50)")
    parser.add_argument(
        "--only",
        default="main,prompt,scale,small,flat",
        help="comma list of: main,prompt,scale,small,flat (flat uploads 4x --size once per round)",
    )
    parser.add_argument(
        "--match", default="", help="run only main-table configurations containing this text"
    )
    parser.add_argument(
        "--keep-page-reporting",
        action="store_true",
        help="leave a VM's free page reporting on (by default it is off for the run: see "
        "PAGE_REPORTING_ORDER in this file)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C must stop the bench even when started with SIGINT ignored (e.g. `cmd &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sections = set(args.only.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    started = time.monotonic()
    # AF_UNIX paths are limited to 107 bytes: sockets live in a short /tmp dir.
    sock_dir = Path(tempfile.mkdtemp(prefix="bfb-", dir="/tmp"))
    work = Path(tempfile.mkdtemp(prefix="work-", dir=args.out))
    result: dict[str, Any] = {
        "machine": machine(),
        "size": args.size,
        "rounds": args.rounds,
        "notes": [],
    }
    cfgs: list[Config] = []
    restore = contextlib.ExitStack()
    try:
        data = prepare(args.data_dir or args.out / "data", work, args.size)
        # Room for what the rows write to the page cache, and free again between runs.
        result["machine"]["memory"] = restore.enter_context(
            host_backed_memory(4 * args.size + 1024 * MiB, args.keep_page_reporting)
        )
        print(result["machine"]["memory"], flush=True)
        copy, note = has_copy()
        if note:
            print(f"NOTE: {note}", flush=True)
            result["notes"].append(note)
        if "main" in sections:
            cfgs = [c for c in configs(copy) if args.match in c.name]
            for cfg in cfgs:
                run_config(cfg, data, work, sock_dir, args.rounds, logs)
            summary = summarize(cfgs)
            result["summary"] = summary
            print()
            print(
                f"size {human(args.size)}, {args.rounds} interleaved rounds, 1 MiB chunks; {result['machine']['cpu']}, {result['machine']['cores']} cores"
            )
            print_table(summary)
            chart(
                summary,
                args.out / "bench.png",
                f"boxfiles bench: {human(args.size)}, {args.rounds} rounds, {result['machine']['cpu']} x{result['machine']['cores']}",
            )
        if "prompt" in sections:
            result["promptness"] = promptness(sock_dir, data.root, logs, args.trials)
        if "scale" in sections:
            result["scale"] = scale(data, sock_dir, data.root, logs, args.rounds)
        if "small" in sections:
            result["small_files"] = small_files(data, sock_dir, data.root, logs, args.rounds, copy)
        if "flat" in sections:
            result["flat"] = flatness(
                data, args.data_dir or args.out / "data", sock_dir, logs, args.size, args.rounds
            )
        result["targets"] = targets(result)
    finally:
        for proc in list(LIVE):  # Ctrl-C or a failure: no child outlives the bench
            _stop(proc)
        restore.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        # Whatever finished is kept, even when a later run failed.
        result["runs"] = [r for c in cfgs for r in c.runs]
        result["wall_seconds"] = time.monotonic() - started
        (args.out / "bench.json").write_text(json.dumps(result, indent=1))
        print(
            f"\nwall time {result['wall_seconds']:.0f}s; wrote {args.out / 'bench.json'}"
            + (f" and {args.out / 'bench.png'}" if "summary" in result else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

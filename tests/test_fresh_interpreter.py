"""A user's first program, in an interpreter that has imported nothing else:
no test fixture, plugin or earlier import can set asyncio up for it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROGRAM = """
import sys
assert "asyncio" not in sys.modules and "grpclib" not in sys.modules
import trio, boxfiles

async def main(d):
    (d / "root").mkdir()
    (d / "a").write_text("hi")
    async with trio.open_nursery() as nursery:
        target = await nursery.start(boxfiles.serve_files, d / "root", f"unix:{d}/s.sock")
        async with boxfiles.open_client(target) as client:
            await client.copy_in(d / "a", "/a")
            await client.copy_out("/a", d / "b")
        nursery.cancel_scope.cancel()
    assert (d / "b").read_text() == "hi"
    print("round trip ok")

from pathlib import Path
trio.run(main, Path(sys.argv[1]))
"""


def test_import_and_round_trip_in_a_fresh_interpreter(sock_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-I", "-W", "error", "-c", PROGRAM, str(sock_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "round trip ok\n"
    assert result.stderr == ""

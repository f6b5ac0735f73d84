"""Regenerate (or, with --check, verify) the code generated from protos/.

The protobuf module, its .pyi stub and the grpclib stubs are committed under
src/boxfiles/_proto/. protoc writes ``import boxlite.v1.files_pb2``; the
imports are rewritten to be package-relative so the generated code lives
inside boxfiles and cannot clash with another copy of the same protos.

Usage: python protos/generate.py [--check]   (run by ``nox -s protos``)
"""

from __future__ import annotations

import argparse
import difflib
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "src" / "boxfiles" / "_proto"
PROTO = "boxlite/v1/files.proto"
OUTPUTS = ("files_pb2.py", "files_pb2.pyi", "files_grpc.py")


def generate(into: Path) -> dict[str, str]:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{HERE}",
            f"--python_out={into}",
            f"--mypy_out={into}",
            f"--grpclib_python_out={into}",
            str(HERE / PROTO),
        ],
        check=True,
        capture_output=True,
    )
    out = {}
    for name in OUTPUTS:
        text = (into / "boxlite" / "v1" / name).read_text()
        text = text.replace("import boxlite.v1.files_pb2\n", "from . import files_pb2\n")
        out[name] = text.replace("boxlite.v1.files_pb2.", "files_pb2.")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code drifted")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    drifted = False
    for name, text in fresh.items():
        target = PACKAGE / name
        current = target.read_text() if target.exists() else ""
        if args.check:
            if current != text:
                drifted = True
                sys.stdout.writelines(
                    difflib.unified_diff(
                        current.splitlines(keepends=True),
                        text.splitlines(keepends=True),
                        f"committed/{name}",
                        f"generated/{name}",
                    )
                )
        elif current != text:
            target.write_text(text)
            print(f"wrote {target.relative_to(HERE.parent)}")
    if drifted:
        print("generated code drifted from protos/: run `nox -s protos`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

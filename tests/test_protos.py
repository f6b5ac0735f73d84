"""The generated code under src/boxfiles/_proto matches protos/ exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_has_not_drifted() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_proto_is_the_spec_contract() -> None:
    from boxfiles._proto import files_pb2

    fields = {
        message: {f.name: (f.number, f.type, f.has_presence) for f in desc.fields}
        for message, desc in files_pb2.DESCRIPTOR.message_types_by_name.items()
    }
    assert fields["UploadChunk"]["source_is_dir"][0] == 6
    assert fields["UploadChunk"]["source_is_dir"][2]  # optional: unset means unknown
    assert {name: spec[0] for name, spec in fields["UploadChunk"].items()} == {
        "dest_path": 1,
        "container_id": 2,
        "data": 3,
        "mkdir_parents": 4,
        "overwrite": 5,
        "source_is_dir": 6,
    }
    assert {name: spec[0] for name, spec in fields["DownloadRequest"].items()} == {
        "src_path": 1,
        "container_id": 2,
        "include_parent": 3,
        "follow_symlinks": 4,
    }
    assert {name: spec[0] for name, spec in fields["DownloadChunk"].items()} == {
        "data": 1,
        "source_is_dir": 2,
    }
    assert {name: spec[0] for name, spec in fields["UploadResponse"].items()} == {
        "success": 1,
        "error": 2,
    }

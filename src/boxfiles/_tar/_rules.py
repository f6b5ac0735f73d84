"""What an archive entry may be, the same for both sides (pure, no I/O).

The rules decide and raise :class:`BadEntry`; each side maps it to its own
error: ``INVALID_ARGUMENT`` from the server's extraction, ``UnsafeArchive``
from copy_out.
"""

from __future__ import annotations

#: Mode bits restored from an archive, on both sides: permissions and sticky.
#: Set-user-ID and set-group-ID bits are never restored (tar's default when
#: not run as root, docker cp's always).
MODE_MASK = 0o1777

#: Most components an archive entry's name may have, on both sides; deeper
#: trees still extract (no walk recurses), this bounds one name's parsing.
MAX_DEPTH = 4096


#: Most entries one archive may hold, on both sides. Placing an archive over
#: an existing tree journals a step per entry it replaces, so memory grows
#: with the entries (about 200 bytes each, measured): this keeps a hostile
#: or mistaken archive of tiny entries to a few hundred MiB at worst.
MAX_ARCHIVE_ENTRIES = 1_000_000


class BadEntry(ValueError):
    """An archive entry no side extracts; the message names it."""


def entry_parts(name: str, what: str = "entry") -> list[str]:
    """``name`` as path components below the extraction's top ("" and "."
    dropped); ``what`` says what the name is in the message ("entry", or
    "hard link x ->" for a link's target).

    Raises:
        BadEntry: the name holds NUL, is absolute, climbs with ``..`` or is
            nested deeper than MAX_DEPTH.
    """
    if "\x00" in name:
        raise BadEntry(f"archive {what} name contains NUL: {name!r}")
    if name.startswith("/"):
        raise BadEntry(f"archive {what} has an absolute name: {name}")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise BadEntry(f"archive {what} contains ..: {name}")
    if len(parts) > MAX_DEPTH:
        raise BadEntry(f"archive {what} is nested deeper than {MAX_DEPTH}: {name[:64]}...")
    return parts

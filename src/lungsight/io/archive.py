"""Zip input: checked member by member, extracted to a temporary folder that is always deleted.

Nothing is extracted until every member has passed the checks (no absolute names, no ``..``, no symbolic
links, member count and declared size under the limits); while extracting, the bytes actually written are
counted as well, so a member that inflates beyond its declared size cannot fill the disk.
"""

from __future__ import annotations

import stat
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from lungsight.errors import InputError

#: Most members a zip may have.
MAX_MEMBERS = 10_000
#: Largest total uncompressed size (bytes) a zip may declare or extract.
MAX_UNCOMPRESSED_BYTES = 4 * 1024**3

#: A zip that would unpack to more than :data:`BOMB_MIN_BYTES` at more than this many bytes per stored byte is
#: refused before anything is written: images and DICOM slices deflate a few times at most (a CT slice's air
#: padding perhaps 20 times), while a zip bomb inflates hundreds or thousands of times.
MAX_RATIO = 100
BOMB_MIN_BYTES = 64 * 1024**2

_CHUNK = 1024 * 1024


def _safe_parts(member: zipfile.ZipInfo, label: str) -> tuple[str, ...]:
    """The path components of a member, refusing absolute names, drive letters and ``..``."""
    raw = member.filename
    unified = raw.replace("\\", "/")
    parts = PurePosixPath(unified).parts
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise InputError(f"{label}: member {raw!r} has an absolute path; refusing to extract it")
    if ".." in parts:
        raise InputError(f"{label}: member {raw!r} points outside the archive ('..'); refusing to extract it")
    if stat.S_ISLNK(member.external_attr >> 16):
        raise InputError(f"{label}: member {raw!r} is a symbolic link; refusing to extract it")
    return tuple(p for p in parts if p not in ("", "."))


@contextmanager
def extracted_zip(
    path: Path,
    label: str,
    *,
    max_members: int | None = None,
    max_bytes: int | None = None,
) -> Iterator[Path]:
    """Yield a temporary folder holding the checked contents of the zip at ``path``; it is deleted afterwards.

    The limits default to :data:`MAX_MEMBERS` and :data:`MAX_UNCOMPRESSED_BYTES` (read at call time).
    """
    max_members = MAX_MEMBERS if max_members is None else max_members
    max_bytes = MAX_UNCOMPRESSED_BYTES if max_bytes is None else max_bytes
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"{label}: not a readable zip file ({type(exc).__name__})") from None
    with archive:
        members = archive.infolist()
        if len(members) > max_members:
            raise InputError(f"{label}: {len(members):,} members exceeds the limit of {max_members:,}")
        planned = [(member, _safe_parts(member, label)) for member in members]
        files = [(m, parts) for m, parts in planned if not m.is_dir() and parts]
        if not files:
            raise InputError(f"{label}: the zip file is empty")
        declared = sum(m.file_size for m, _ in files)
        if declared > max_bytes:
            raise InputError(f"{label}: {declared:,} bytes uncompressed exceeds the limit of {max_bytes:,} bytes")
        stored = sum(m.compress_size for m, _ in files)
        if declared > BOMB_MIN_BYTES and declared > MAX_RATIO * max(stored, 1):
            raise InputError(
                f"{label}: {stored:,} bytes would unpack to {declared:,} ({declared // max(stored, 1):,} times as "
                f"many); images do not compress like that, so it is refused as a zip bomb"
            )
        with tempfile.TemporaryDirectory(prefix="lungsight-") as tmp:
            root = Path(tmp)
            written = 0
            for member, parts in files:
                target = root.joinpath(*parts)
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(member) as source, target.open("wb") as sink:
                        while chunk := source.read(_CHUNK):
                            written += len(chunk)
                            if written > max_bytes:
                                raise InputError(
                                    f"{label}: member {member.filename!r} inflates beyond the limit of "
                                    f"{max_bytes:,} bytes"
                                )
                            sink.write(chunk)
                except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, NotImplementedError) as exc:
                    raise InputError(
                        f"{label}: member {member.filename!r} cannot be extracted ({type(exc).__name__})"
                    ) from None
            yield root

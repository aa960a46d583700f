"""Uploads: streamed to a per-job folder under neutral names, read into a de-identified Study, then deleted.

The request body is parsed as it arrives (``python_multipart``'s streaming parser) and each ``file`` part goes
straight to ``<work>/files/NNNN<ext>``: the body is never held in memory and never exceeds the size limit on disk.
The client's file name is used for its extension only. Zip contents are extracted with the archive checks of
:func:`lungsight.io.archive.extracted_zip` under this server's limits and renamed to neutral names that keep
their natural order before anything reads them, so neither an upload's name nor a member's name can reach a
result, a log record or an error message.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from lungsight.errors import LungsightError
from lungsight.io import IGNORED_SUFFIXES, load_study
from lungsight.io.archive import extracted_zip
from lungsight.io.images import IMAGE_SUFFIXES, natural_key
from lungsight.serve.settings import Settings
from lungsight.study import Study

#: Extensions kept from a client's file name (everything else is read by content, as DICOM).
KNOWN_SUFFIXES = frozenset({".zip", ".nii", ".nii.gz", ".dcm", ".dicom", *IMAGE_SUFFIXES, *IGNORED_SUFFIXES})
#: Names of OS clutter that the readers skip; they are kept as they are so that they are still skipped.
_CLUTTER = frozenset({"__macosx", "thumbs.db", "desktop.ini"})
_MAX_FIELD_BYTES = 64


class RequestError(Exception):
    """A request the service refuses, with the HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())
        self.headers = headers or {}


@dataclass
class Upload:
    """What one request delivered: files on disk (neutral names, in the order sent) and the form fields."""

    folder: Path
    files: list[Path] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    size: int = 0

    @property
    def files_dir(self) -> Path:
        return self.folder / "files"


def suffix_of(name: str) -> str:
    """The known extension of a file name, lower case (``.nii.gz`` whole), or ``""``."""
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return ".nii.gz"
    suffix = os.path.splitext(lower)[1]
    return suffix if suffix in KNOWN_SUFFIXES else ""


class _PartWriter:
    """Callbacks for the multipart parser: ``file`` parts to disk, small text fields to memory."""

    def __init__(self, upload: Upload, max_files: int) -> None:
        self.upload = upload
        self.max_files = max_files
        self.headers: dict[str, bytes] = {}
        self.header_field = b""
        self.header_value = b""
        self.sink: IO[bytes] | None = None
        self.field_name: str | None = None
        self.field_value = b""

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field_data,
            "on_header_value": self.header_value_data,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
        }

    def part_begin(self) -> None:
        self.headers, self.field_name, self.field_value = {}, None, b""

    def header_field_data(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def header_value_data(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def header_end(self) -> None:
        self.headers[self.header_field.decode("latin-1").lower()] = self.header_value
        self.header_field = self.header_value = b""

    def headers_finished(self) -> None:
        _, params = parse_options_header(self.headers.get("content-disposition"))
        name = params.get(b"name", b"").decode("latin-1")
        if name != "file":
            self.field_name = name
            return
        if len(self.upload.files) >= self.max_files:
            raise RequestError(413, f"more than {self.max_files:,} files in one upload (the server's limit)")
        filename = params.get(b"filename", b"").decode("utf-8", "replace")
        path = self.upload.files_dir / f"{len(self.upload.files):04d}{suffix_of(filename)}"
        path.parent.mkdir(mode=0o700, exist_ok=True)
        self.sink = path.open("wb")
        self.upload.files.append(path)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.sink is not None:
            self.sink.write(data[start:end])
        elif self.field_name is not None:
            self.field_value += data[start:end]
            if len(self.field_value) > _MAX_FIELD_BYTES:
                raise RequestError(400, f"form field {self.field_name[:32]!r} is too long")

    def part_end(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
        elif self.field_name:
            self.upload.fields[self.field_name] = self.field_value.decode("utf-8", "replace").strip()

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


async def receive_upload(
    content_type: str, content_length: str | None, body: AsyncIterator[bytes], folder: Path, settings: Settings
) -> Upload:
    """Stream a ``multipart/form-data`` body into ``folder``, refusing it as soon as it passes the size limit."""
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise RequestError(415, "send the study as multipart/form-data with one or more 'file' fields")
    limit = settings.max_upload_bytes
    too_big = f"the upload is larger than the server's limit of {limit:,} bytes"
    if content_length and content_length.isdigit() and int(content_length) > limit:
        raise RequestError(413, too_big)
    upload = Upload(folder)
    writer = _PartWriter(upload, settings.max_files)
    parser = MultipartParser(params[b"boundary"], writer.callbacks())
    try:
        async for chunk in body:
            upload.size += len(chunk)
            if upload.size > limit:
                raise RequestError(413, too_big)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError:
        raise RequestError(400, "the multipart/form-data body is malformed") from None
    finally:
        writer.close()
    if not upload.files:
        raise RequestError(400, "no file in the upload: send the study in a field named 'file'")
    return upload


def _neutral_name(name: str, rank: int) -> str:
    """A member's name without anything a person chose: its rank among its siblings and its extension."""
    if name.lower() in _CLUTTER:
        return name.lower()
    return f"{'.' if name.startswith('.') else ''}{rank:05d}{suffix_of(name)}"


def _neutral_tree(root: Path) -> Path:
    """Move every file under ``root`` into a new folder under neutral names that sort in the same order."""
    files = sorted(p.relative_to(root).parts for p in root.rglob("*") if p.is_file())
    children: dict[tuple[str, ...], set[str]] = {}
    for parts in files:
        for depth, part in enumerate(parts):
            children.setdefault(parts[:depth], set()).add(part)
    rank = {
        (parent, name): i for parent, names in children.items() for i, name in enumerate(sorted(names, key=natural_key))
    }
    dest = Path(tempfile.mkdtemp(prefix=".neutral-", dir=root))
    for parts in files:
        new = [_neutral_name(part, rank[(parts[:depth], part)]) for depth, part in enumerate(parts)]
        target = dest.joinpath(*new)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(root.joinpath(*parts), target)
    return dest


def _relabelled(exc: LungsightError, paths: dict[str, str]) -> LungsightError:
    """The same error with the server's folder names replaced by the neutral labels the client knows."""
    message = str(exc)
    for path, label in paths.items():
        message = message.replace(path, label)
    return type(exc)(message)


def read_upload(upload: Upload, settings: Settings, modality: str | None) -> Study:
    """Read the uploaded study (one zip, one file, or several files as one folder) into a de-identified Study.

    Files are named ``upload/NNNN.ext`` in messages (NNNN: the file's position in the upload), members of a zip
    ``upload.zip/...`` with their neutral names.
    """
    kw = {"modality": modality, "max_pixels": settings.max_pixels}
    files_label = {str(upload.files_dir): "upload"}
    try:
        if len(upload.files) == 1 and suffix_of(upload.files[0].name) == ".zip":
            with extracted_zip(
                upload.files[0],
                "upload.zip",
                max_members=settings.max_zip_members,
                max_bytes=settings.max_unpacked_bytes,
            ) as root:
                neutral = _neutral_tree(root)
                try:
                    return load_study(neutral, **kw)
                except LungsightError as exc:
                    raise _relabelled(exc, {str(neutral): "upload.zip"}) from None
        target = upload.files[0] if len(upload.files) == 1 else upload.files_dir
        return load_study(target, **kw)
    except LungsightError as exc:
        raise _relabelled(exc, files_label) from None

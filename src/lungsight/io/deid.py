"""What may leave a DICOM header: a whitelist of technical tags, and the identifying tags that never may.

A :class:`~lungsight.study.Study` only ever receives values picked by :func:`whitelisted_metadata`. Error
messages that quote a library's exception text pass through :func:`redact` first, which removes any
identifying value of the file being read, so a patient name cannot reach a message even through a
third-party error string.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

#: DICOM keywords copied into ``Study.metadata`` (technical, not identifying). Free-text fields such as
#: SeriesDescription, StudyDescription, ProtocolName or ImageComments are deliberately absent: sites write
#: names, dates and record numbers into them.
METADATA_WHITELIST: tuple[str, ...] = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "PhotometricInterpretation",
    "BitsStored",
    "Rows",
    "Columns",
    "PixelSpacing",
    "SliceThickness",
    "KVP",
    "ConvolutionKernel",
    "ImageOrientationPatient",
    "RescaleSlope",
    "RescaleIntercept",
)

#: Keys lungsight derives itself and may add to ``Study.metadata`` next to the whitelist.
DERIVED_KEYS: tuple[str, ...] = (
    "series_id",  # short sha256 of SeriesInstanceUID, never the UID itself
    "n_slices",
    "orientation",
    "voi_lut_applied",
    "monochrome1_inverted",
    "nifti_axcodes",
)

#: Identifying or pseudo-identifying DICOM keywords. None of their values may reach a Study, a warning, an
#: error message or a log record. UIDs are pseudo-identifiers (they link records across systems), so they
#: are listed too.
IDENTIFYING_TAGS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MilitaryRank",
    "MedicalRecordLocator",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "OperatorsName",
    "StationName",
    "DeviceSerialNumber",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "AcquisitionDate",
    "AcquisitionDateTime",
    "ContentDate",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "ImageComments",
    "RequestedProcedureID",
    "ScheduledProcedureStepID",
    "PerformedProcedureStepID",
)

_MAX_TEXT = 64


def series_id(uid: str) -> str:
    """The short, non-reversible id shown for a SeriesInstanceUID (12 hex digits of its sha256)."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:12]


def _plain(value: Any) -> Any:
    """A JSON-serialisable copy of a pydicom value (numbers stay numbers, multi-values become lists)."""
    if isinstance(value, MultiValue | list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)[:_MAX_TEXT]


def whitelisted_metadata(ds: Dataset) -> dict[str, Any]:
    """The whitelisted tags of ``ds`` that are present and non-empty, as plain Python values."""
    out: dict[str, Any] = {}
    for keyword in METADATA_WHITELIST:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        out[keyword] = _plain(value)
    return out


def identifying_values(ds: Dataset) -> set[str]:
    """Every identifying value of ``ds`` (and its name components) at least three characters long."""
    values: set[str] = set()
    for keyword in IDENTIFYING_TAGS:
        value = ds.get(keyword)
        if value is None:
            continue
        items = value if isinstance(value, MultiValue | list) else [value]
        for item in items:
            text = str(item).strip()
            values.add(text)
            values.update(re.split(r"[\^=\s]+", text))
    return {v for v in values if len(v) >= 3}


def redact(text: str, values: set[str]) -> str:
    """``text`` on one line, shortened, with every value of ``values`` replaced by ``[redacted]``."""
    line = " ".join(text.split())
    for value in sorted(values, key=len, reverse=True):
        line = re.sub(re.escape(value), "[redacted]", line, flags=re.IGNORECASE)
    return line[:200]

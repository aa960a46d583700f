"""Labelled chest X-ray collections: the free-text ``finding`` mapped to three classes, frontal views only.

Two layouts are read:

* ``metadata.csv`` as in the COVID-19 image data collection (Cohen et al.) and the Actualmed COVID-19 set
  (columns ``file, patientid, finding, view`` and optionally ``sex, age, modality``; images in ``images/``);
* a plain ``labels.csv`` (``file, label, patient_id`` and optionally ``sex, view, source``) whose labels are
  class names or findings.

Every row that is left out is returned with its reason, so a run can say what it did not use and why. The
mapping table and the class counts it gives on the shared data are in ``docs/xray-data.md``.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lungsight.errors import InputError
from lungsight.io.contract import view_kind
from lungsight.io.images import natural_key

#: Class order used by models: the positive class ("covid") last, as for the CT models.
CXR_CLASSES: tuple[str, ...] = ("normal", "other-pneumonia", "covid")

#: Finding components that name COVID-19.
COVID_TERMS = frozenset({"covid-19", "covid19", "covid", "sars-cov-2", "sars-cov2", "2019-ncov"})
#: Finding components that mean no abnormality.
NORMAL_TERMS = frozenset({"no finding", "no findings", "normal"})
#: Finding components naming a pneumonia other than COVID-19: bacterial, viral (including the coronaviruses SARS
#: and MERS, as COVIDx does), fungal, and the generic labels of the pneumonia collections.
PNEUMONIA_TERMS = frozenset(
    {
        "pneumonia",
        "bacterial",
        "bacterial pneumonia",
        "viral",
        "viral pneumonia",
        "fungal",
        "fungal pneumonia",
        "aspiration",
        "streptococcus",
        "klebsiella",
        "mycoplasma",
        "mycoplasma bacterial pneumonia",
        "legionella",
        "e.coli",
        "e. coli",
        "chlamydophila",
        "staphylococcus",
        "mrsa",
        "nocardia",
        "pneumocystis",
        "aspergillosis",
        "varicella",
        "herpes",
        "influenza",
        "h1n1",
        "sars",
        "mers",
        "mers-cov",
        "lung opacity",
    }
)
#: A finding component that may accompany a named cause without changing the class (ARDS as a complication).
COMPLICATION_TERMS = frozenset({"ards"})
#: Placeholders: the label is not known yet.
PLACEHOLDER_TERMS = frozenset({"todo", "unknown", "inconclusive", "?"})

_ARDS_REASON = (
    "ARDS alone is left out: acute respiratory distress syndrome is a pattern of lung injury with many causes "
    "(sepsis, trauma, aspiration, COVID-19 itself), so without a named cause it is neither covid nor another "
    "pneumonia"
)


def _normal_form(text: str) -> str:
    return " ".join(text.lower().split())


def finding_terms(finding: str) -> list[str]:
    """The components of a finding: ``"Pneumonia/Viral/COVID-19"`` and ``"COVID-19, ARDS"`` both have several."""
    return [t for t in (_normal_form(part) for part in re.split(r"[/,;]", finding)) if t]


def explain_finding(finding: str, source: str = "") -> tuple[str | None, str]:
    """The class of a free-text finding (one of :data:`CXR_CLASSES`, or ``None``: left out) and why.

    Rules, in order (case and spacing ignored; components separated by ``/``, ``,`` or ``;``):

    1. empty -> left out (Actualmed leaves the finding empty for inconclusive images);
    2. a placeholder component (todo, unknown, ...) -> left out;
    3. any COVID-19 component -> ``covid`` ("COVID-19, ARDS", "Pneumonia/Viral/COVID-19");
    4. only no-finding components -> ``normal``; mixed with anything else -> left out (contradictory);
    5. pneumonia components only (ARDS allowed beside them) -> ``other-pneumonia``; SARS and MERS are
       coronavirus pneumonias but not COVID-19, and belong here as in COVIDx;
    6. ARDS alone, tuberculosis, and anything not in the table -> left out, never guessed.

    ``source`` only words the reason (``"actualmed"``: an empty finding is the dataset's inconclusive mark).
    """
    terms = finding_terms(finding)
    if not terms:
        if source == "actualmed":
            return None, "empty finding: inconclusive in the Actualmed metadata"
        return None, "empty finding"
    shown = " ".join(finding.split())
    if PLACEHOLDER_TERMS.intersection(terms):
        return None, f"finding {shown!r} is a placeholder, not a diagnosis"
    if COVID_TERMS.intersection(terms):
        return "covid", f"finding {shown!r} names COVID-19"
    if NORMAL_TERMS.intersection(terms):
        if all(t in NORMAL_TERMS for t in terms):
            return "normal", f"finding {shown!r} means no abnormality"
        return None, f"finding {shown!r} mixes no finding with a disease"
    causes = [t for t in terms if t not in COMPLICATION_TERMS]
    if causes and all(t in PNEUMONIA_TERMS for t in causes):
        return "other-pneumonia", f"finding {shown!r} is a pneumonia other than COVID-19"
    if not causes:
        return None, _ARDS_REASON
    if "tuberculosis" in causes:
        return None, f"finding {shown!r}: tuberculosis is not one of the three classes"
    return None, f"finding {shown!r} is not in the mapping table"


def map_finding(finding: str, source: str = "") -> str | None:
    """One of :data:`CXR_CLASSES` for a free-text finding, or ``None`` when the row is left out.

    See :func:`explain_finding` for the rules and ``docs/xray-data.md`` for the table.
    """
    return explain_finding(finding, source)[0]


def sensor_hint(file_name: str) -> str:
    """``"CR"`` or ``"DX"`` where a file name says which detector made it (Actualmed names start ``CR.`` or
    ``DX.``, from their DICOM Modality), else ``"unknown"``: the sensor split of paper 004's bias audit."""
    prefix = file_name.split(".", 1)[0].upper()
    return prefix if prefix in ("CR", "DX") and "." in file_name else "unknown"


@dataclass(frozen=True)
class CxrRecord:
    """One labelled frontal chest X-ray. ``patient_id`` is prefixed with its source (``"cohen:2"``)."""

    path: Path
    label: str
    patient_id: str
    source: str
    sex: str
    view: str
    finding: str
    age: str = ""

    @property
    def file(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class CxrTable:
    """The rows of one collection as written, with the folder that holds its images."""

    root: Path
    csv_path: Path
    image_dir: Path
    layout: str  # "metadata" (Cohen/Actualmed metadata.csv) or "labels" (plain labels.csv)
    rows: list[dict[str, str]]


def _source_name(root: Path) -> str:
    name = root.resolve().name.lower()
    return name.removeprefix("cxr-") or name


def read_cxr_table(root: Path) -> CxrTable:
    """Read ``root/metadata.csv`` (or ``root/labels.csv``) and check its columns; rows are not interpreted."""
    root = Path(root)
    layouts = {
        "metadata": (root / "metadata.csv", {"file", "patientid", "finding"}),
        "labels": (root / "labels.csv", {"file", "label", "patient_id"}),
    }
    layout = next((name for name, (path, _) in layouts.items() if path.is_file()), None)
    if layout is None:
        raise InputError(f"{root}: no metadata.csv (Cohen/Actualmed layout) or labels.csv (file,label,patient_id)")
    csv_path, needed = layouts[layout]
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = needed - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
        rows = [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]
    if not rows:
        raise InputError(f"{csv_path}: no rows")
    image_dir = root / "images" if (root / "images").is_dir() else root
    return CxrTable(root, csv_path, image_dir, layout, rows)


def _label(row: dict[str, str], layout: str, source: str) -> tuple[str | None, str, str]:
    """(class or None, reason, the finding as written)."""
    finding = row["finding"] if layout == "metadata" else row["label"]
    if layout == "labels" and _normal_form(finding) in CXR_CLASSES:
        return _normal_form(finding), "class name", finding
    label, reason = explain_finding(finding, source)
    return label, reason, finding


def read_cxr_folder(root: Path, source: str | None = None) -> tuple[list[CxrRecord], list[tuple[str, str]]]:
    """Frontal, labelled X-rays of one collection, and ``(file, reason)`` for every row left out.

    A row is left out, with the first reason that applies, when its image is missing, its modality is not
    X-ray, its view is lateral or not frontal, its finding does not map to a class (:func:`explain_finding`),
    or it has no patient id. ``source`` (default: the folder name without ``cxr-``) prefixes patient ids, so
    that ids from different collections never collide. A row without a view is kept: a plain labels.csv need not
    record one, and prediction checks the view of every image anyway.
    """
    table = read_cxr_table(root)
    src = source or _source_name(table.root)
    patient_key = "patientid" if table.layout == "metadata" else "patient_id"
    records: list[CxrRecord] = []
    left_out: list[tuple[str, str]] = []
    for row in table.rows:
        file = row["file"]
        row_source = row.get("source") or src
        path = table.image_dir / file
        view = row.get("view", "")
        modality = _normal_form(row.get("modality", ""))
        label, reason, finding = _label(row, table.layout, row_source)
        if not file or not path.is_file():
            left_out.append((file, f"image file not found in {table.image_dir}"))
        elif modality not in ("", "x-ray", "xray", "cr", "dx", "xr"):
            left_out.append((file, f"modality {row['modality']!r} is not an X-ray"))
        elif view and (kind := view_kind(view)) != "frontal":
            what = {"lateral": "a lateral view", "oblique": "an oblique view"}.get(kind or "", "not a frontal view")
            left_out.append((file, f"view {view!r} is {what}; only frontal (PA/AP) views are classified"))
        elif label is None:
            left_out.append((file, reason))
        elif not row.get(patient_key):
            left_out.append((file, "no patient id"))
        else:
            records.append(
                CxrRecord(
                    path=path,
                    label=label,
                    patient_id=f"{row_source}:{row[patient_key]}",
                    source=row_source,
                    sex=row.get("sex", ""),
                    view=view,
                    finding=finding,
                    age=row.get("age", ""),
                )
            )
    records.sort(key=lambda r: (r.patient_id, natural_key(r.file)))
    return records, left_out


def read_cxr_datasets(roots: Iterable[Path]) -> tuple[list[CxrRecord], list[tuple[str, str]]]:
    """:func:`read_cxr_folder` on each root, concatenated; left-out files are named ``<root>/<file>``."""
    records: list[CxrRecord] = []
    left_out: list[tuple[str, str]] = []
    seen: dict[str, Path] = {}
    for root in roots:
        found, skipped = read_cxr_folder(Path(root))
        for source in sorted({r.source for r in found}):
            if source in seen:
                raise InputError(
                    f"{root}: source {source!r} is also the source of {seen[source]}; a collection is read once "
                    "and two collections need different folder names (or source columns)"
                )
            seen[source] = Path(root)
        records += found
        left_out += [(f"{Path(root).name}/{file}", reason) for file, reason in skipped]
    return records, left_out

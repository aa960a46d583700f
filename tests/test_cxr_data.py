"""X-ray labels: the finding -> class table on every value in the real metadata, and the readers on both folders."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import pytest

from lungsight.errors import InputError
from lungsight.io.contract import view_kind
from lungsight.train.cxr_data import (
    CXR_CLASSES,
    explain_finding,
    map_finding,
    read_cxr_datasets,
    read_cxr_folder,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "xray-data.md"

#: Every distinct finding in the two shared metadata files and its class (docs/xray-data.md, same table).
REAL_FINDINGS = {
    "cohen": {
        "COVID-19": "covid",
        "COVID-19, ARDS": "covid",
        "No Finding": "normal",
        "Pneumocystis": "other-pneumonia",
        "Pneumonia": "other-pneumonia",
        "SARS": "other-pneumonia",
        "Streptococcus": "other-pneumonia",
        "Klebsiella": "other-pneumonia",
        "Mycoplasma Bacterial Pneumonia": "other-pneumonia",
        "Varicella": "other-pneumonia",
        "E.Coli": "other-pneumonia",
        "Legionella": "other-pneumonia",
        "Bacterial": "other-pneumonia",
        "Influenza": "other-pneumonia",
        "ARDS": None,
    },
    "actualmed": {"COVID-19": "covid", "No finding": "normal", "": None},
}

HAND_WRITTEN = {
    "covid-19": "covid",
    "  COVID-19 ,  ARDS ": "covid",
    "Pneumonia/Viral/COVID-19": "covid",
    "pneumonia / viral / covid-19": "covid",
    "Pneumonia/Viral/SARS": "other-pneumonia",
    "Pneumonia/Viral/MERS-CoV": "other-pneumonia",
    "MERS": "other-pneumonia",
    "Pneumonia/Bacterial/Chlamydophila": "other-pneumonia",
    "Pneumonia/Bacterial/Staphylococcus/MRSA": "other-pneumonia",
    "Pneumonia/Fungal/Pneumocystis": "other-pneumonia",
    "Pneumonia/Viral/Influenza/H1N1": "other-pneumonia",
    "Lung Opacity": "other-pneumonia",
    "Pneumonia, ARDS": "other-pneumonia",
    "mycoplasma   bacterial pneumonia": "other-pneumonia",
    "NO FINDING": "normal",
    "Normal": "normal",
    "ARDS": None,
    " ards ": None,
    "": None,
    "   ": None,
    "todo": None,
    "Unknown": None,
    "Tuberculosis": None,
    "Pneumonia/Bacterial/Tuberculosis": None,
    "Pneumonia/Lipoid": None,
    "No Finding, Pneumonia": None,
    "COVID-19, todo": None,
    "Cardiomegaly": None,
}


def _findings(folder: Path) -> Counter[str]:
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as handle:
        return Counter(row["finding"].strip() for row in csv.DictReader(handle))


@pytest.mark.parametrize("source", ["cohen", "actualmed"])
def test_table_covers_every_real_finding(shared_data: Path, source: str) -> None:
    present = _findings(shared_data / f"cxr-{source}")
    assert set(present) == set(REAL_FINDINGS[source]), "a finding is missing from the table (docs/xray-data.md)"
    for finding, expected in REAL_FINDINGS[source].items():
        assert map_finding(finding, source) == expected, finding


def test_doc_table_lists_every_real_finding_with_its_class_and_count(shared_data: Path) -> None:
    doc = DOC.read_text(encoding="utf-8")
    for source, table in REAL_FINDINGS.items():
        counts = _findings(shared_data / f"cxr-{source}")
        for finding, expected in table.items():
            shown = f"`{finding}`" if finding else "(empty)"
            cls = expected or "left out"
            assert re.search(rf"\| cxr-{source} \| {re.escape(shown)} \| {counts[finding]} \| {cls}", doc), finding


@pytest.mark.parametrize(("finding", "expected"), sorted(HAND_WRITTEN.items()))
def test_hand_written_findings(finding: str, expected: str | None) -> None:
    assert map_finding(finding, "cohen") == expected


def test_reasons_say_why() -> None:
    assert "ARDS alone" in explain_finding("ARDS", "cohen")[1]
    assert "inconclusive" in explain_finding("", "actualmed")[1]
    assert "placeholder" in explain_finding("todo", "cohen")[1]
    assert "tuberculosis" in explain_finding("Tuberculosis", "cohen")[1]
    assert "not in the mapping table" in explain_finding("Cardiomegaly", "cohen")[1]
    assert "mixes no finding" in explain_finding("No Finding, Pneumonia", "cohen")[1]


@pytest.mark.parametrize(
    ("view", "kind"),
    [
        ("PA", "frontal"),
        ("AP", "frontal"),
        ("AP Supine", "frontal"),
        ("ap  erect", "frontal"),
        ("L", "lateral"),
        ("LL", "lateral"),
        ("Lateral", "lateral"),
        ("rl", "lateral"),
        ("LLO", "oblique"),
        ("Oblique", "oblique"),
        ("PAX", None),
        ("Axial", None),
        ("Coronal", None),
        ("", None),
        ("APPLE", None),
    ],
)
def test_view_kind(view: str, kind: str | None) -> None:
    assert view_kind(view) == kind


def _doc_counts(source: str) -> dict[str, tuple[int, int]]:
    """(images, patients) per class from the measured-classes table of docs/xray-data.md."""
    pattern = rf"^\| {source} \| (\d+) \((\d+)\) \| (\d+) \((\d+)\) \| (\d+) \((\d+)\) \|"
    found = re.search(pattern, DOC.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert found, f"no class-count row for {source} in {DOC.name}"
    numbers = [int(g) for g in found.groups()]
    return {c: (numbers[2 * i], numbers[2 * i + 1]) for i, c in enumerate(CXR_CLASSES)}


@pytest.mark.parametrize(
    ("source", "left_out"),
    [
        ("cxr-cohen", {"lateral view": 32, "ARDS alone": 3}),
        ("cxr-actualmed", {"inconclusive": 9}),
    ],
)
def test_reader_on_real_folder_matches_documented_counts(
    shared_data: Path, source: str, left_out: dict[str, int]
) -> None:
    records, skipped = read_cxr_folder(shared_data / source)
    measured = {
        c: (sum(r.label == c for r in records), len({r.patient_id for r in records if r.label == c}))
        for c in CXR_CLASSES
    }
    assert measured == _doc_counts(source)
    prefix = source.removeprefix("cxr-") + ":"
    assert all(r.patient_id.startswith(prefix) and len(r.patient_id) > len(prefix) for r in records)
    assert all(r.source == prefix[:-1] and r.path.is_file() for r in records)
    assert all(view_kind(r.view) == "frontal" for r in records)
    assert all(r.label in CXR_CLASSES for r in records)
    assert len(skipped) == sum(left_out.values())
    for phrase, n in left_out.items():
        assert sum(phrase in reason for _, reason in skipped) == n, phrase
    assert len(records) + len(skipped) == sum(_findings(shared_data / source).values())


def test_every_lateral_image_is_left_out(shared_data: Path) -> None:
    folder = shared_data / "cxr-cohen"
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as handle:
        laterals = {row["file"] for row in csv.DictReader(handle) if row["view"] == "L"}
    records, skipped = read_cxr_folder(folder)
    assert laterals and not laterals & {r.file for r in records}
    assert laterals == {f for f, reason in skipped if "lateral" in reason}


def test_both_sources_together(shared_data: Path) -> None:
    roots = [shared_data / "cxr-cohen", shared_data / "cxr-actualmed"]
    records, skipped = read_cxr_datasets(roots)
    assert Counter(r.label for r in records) == {"covid": 373, "other-pneumonia": 60, "normal": 26}
    assert {r.source for r in records} == {"cohen", "actualmed"}
    assert len({r.patient_id for r in records}) == 277
    assert len(skipped) == 44 and all(f.startswith(("cxr-cohen/", "cxr-actualmed/")) for f, _ in skipped)
    with pytest.raises(InputError, match="also the source of"):
        read_cxr_datasets([roots[0], roots[0]])


def test_plain_labels_csv(shared_data: Path, tmp_path: Path) -> None:
    images = sorted((shared_data / "cxr-actualmed" / "images").glob("*.png"))[:5]
    (tmp_path / "images").mkdir()
    for path in images:
        (tmp_path / "images" / path.name).symlink_to(path)
    rows = [
        "file,label,patient_id,view,source",
        f"{images[0].name},covid,p1,PA,site",
        f"{images[1].name}, Other-Pneumonia ,p2,,site",
        f"{images[2].name},No Finding,p3,AP,",
        f"{images[3].name},normal,p4,L,site",
        f"{images[4].name},cardiomegaly,p5,PA,site",
        "missing.png,covid,p6,PA,site",
        f"{images[0].name},covid,,PA,site",
    ]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    records, skipped = read_cxr_folder(tmp_path, source="mine")
    assert [(r.label, r.patient_id) for r in records] == [
        ("normal", "mine:p3"),
        ("covid", "site:p1"),
        ("other-pneumonia", "site:p2"),
    ]
    reasons = dict(skipped[:3])
    assert "lateral" in reasons[images[3].name]
    assert "not in the mapping table" in reasons[images[4].name]
    assert "not found" in reasons["missing.png"]
    assert skipped[3] == (images[0].name, "no patient id")


def test_missing_csv_and_columns(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no metadata\.csv"):
        read_cxr_folder(tmp_path)
    (tmp_path / "metadata.csv").write_text("file,finding\na.png,COVID-19\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"missing column\(s\) patientid"):
        read_cxr_folder(tmp_path)
    (tmp_path / "metadata.csv").write_text("file,patientid,finding\n", encoding="utf-8")
    with pytest.raises(InputError, match="no rows"):
        read_cxr_folder(tmp_path)


def test_sensor_hint_reads_actualmed_names_only():
    from lungsight.train.cxr_data import sensor_hint

    assert sensor_hint("CR.1.2.840.113564.1722810170.png") == "CR"
    assert sensor_hint("DX.1.2.3.png") == "DX"
    assert sensor_hint("auntminnie-a-2020.jpg") == "unknown"
    assert sensor_hint("CR") == "unknown"

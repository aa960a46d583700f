"""The golden end-to-end cases: real studies from ../shared/data run through ct-default.

``python tests/golden/record.py`` re-records ``references.json`` after a deliberate change of ct-default or of the
pipeline; the diff of that file is then part of the change and must be explained in its commit message.
"""

from __future__ import annotations

from pathlib import Path

CASES: dict[str, str] = {
    "dicom-series": "ct-volume/dicom",
    "nifti-abdomen": "ct-volume/example_ct.nii.gz",
    "nifti-lower-chest": "ct-volume/example_ct_sm.nii.gz",
    "covid-ct-png": "covid-ct/images/COVID/2020.03.04.20031047-p13-84%3.png",
    "covid-ct-jpg": "covid-ct/images/NonCOVID/78.jpg",
}
BUNDLED_EXAMPLE = "bundled-example"
REFERENCES = Path(__file__).with_name("references.json")
PROB_TOLERANCE = 2e-3  # float32 CPU kernels differ slightly between machines


def summary(result: dict) -> dict:
    """The parts of result.json that a golden reference pins down."""
    return {
        "label": result["decision"]["label"],
        "rule": result["decision"]["rule"],
        "selected": result["slices"]["selected"],
        "n_slices": result["slices"]["n_total"],
        "p": [s["p"] for s in result["slice_probabilities"]],
        "rules": {k: v["positive"] for k, v in result["rules"].items()},
    }

"""``lungsight evaluate`` for X-ray models: three-class metrics, the bias audit, evidence in the lungs, t-SNE.

Every labelled frontal X-ray of the given folders (Cohen/Actualmed ``metadata.csv`` or a plain ``labels.csv``, read
by :mod:`lungsight.train.cxr_data`) goes through the same path as ``lungsight predict`` - the input contract, lung
segmentation, the model's scheme, Grad-CAM and the evidence-in-lung share - so what is measured is what a user gets.
An image the contract refuses (a lateral view the metadata missed, a blank image) is listed in ``skipped.csv`` with
the reason, not silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lungsight.errors import InputError, LungsightError
from lungsight.fileio import atomic_write_csv
from lungsight.inference.detector import Detector

AUDIT_KEYS = ("sex", "view", "source", "sensor")


def evaluate_xray(
    data: Sequence[Path],
    model: str | Path,
    out: Path,
    *,
    by: Sequence[str] = ("sex", "view", "source"),
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Predict every labelled X-ray in ``data`` with ``model`` and write the three-class evaluation into ``out``."""
    from lungsight.evaluate.embedding import penultimate_features
    from lungsight.evaluate.multiclass import write_multiclass_evaluation
    from lungsight.io import load_study
    from lungsight.train.cxr import share_summary
    from lungsight.train.cxr_data import read_cxr_datasets, sensor_hint

    unknown = [k for k in by if k not in AUDIT_KEYS]
    if unknown:
        raise InputError(f"--by {','.join(unknown)}: can split by {', '.join(AUDIT_KEYS)}")
    det = Detector.from_pretrained(model)
    if det.config.get("task") != "cxr":
        raise InputError(f"model {model!s} is not an X-ray model")
    records, left_out = read_cxr_datasets([Path(d) for d in data])
    classes = det.classes
    rows, probs, feats, skipped = [], [], [], [dict(file=f, reason=r) for f, r in left_out]
    for r in tqdm(records, desc="evaluate", unit="X-ray", disable=None):
        if r.label not in classes:
            skipped.append({"file": r.path.name, "reason": f"label {r.label!r} is not a class of the model"})
            continue
        try:
            study = load_study(r.path, modality="XR")
            pred = det.predict(study)
        except LungsightError as exc:
            skipped.append({"file": r.path.name, "reason": str(exc)})
            continue
        p = np.array([pred.probabilities[c] for c in classes])
        ev = pred.evidence[0]
        feats.append(penultimate_features(det.model, [det.inputs(ev.slice01[None])])[0])
        probs.append(p)
        share = pred.result["evidence"]["lung_share"]
        lung_area = pred.result["evidence"]["lung_area"]
        sensor = str(study.metadata.get("Modality", "")) or sensor_hint(r.path.name)
        rows.append(
            {
                "file": r.path.name,
                "patient_id": r.patient_id,
                "label": r.label,
                "predicted": pred.label,
                **{f"p_{c}": float(p[k]) for k, c in enumerate(classes)},
                "lung_share": "" if share is None else share,
                "lung_area": lung_area,
                "flagged": int(bool(pred.result["evidence"]["flagged"])),
                "sex": r.sex or "unknown",
                "view": r.view or "unknown",
                "source": r.source or "unknown",
                "sensor": sensor,
            }
        )
    if not rows:
        raise InputError(f"{', '.join(map(str, data))}: no labelled frontal X-ray could be evaluated")
    out = Path(out)
    atomic_write_csv(out / "skipped.csv", skipped)
    explained = [r for r in rows if r["lung_share"] != ""]
    return write_multiclass_evaluation(
        out,
        [classes.index(r["label"]) for r in rows],
        np.stack(probs),
        classes,
        [r["patient_id"] for r in rows],
        attributes={k: [r[k] for r in rows] for k in (*AUDIT_KEYS, "lung_share", "lung_area", "flagged")},
        by=tuple(by),
        embeddings=np.stack(feats),
        extra={
            "model": {
                "name": det.entry.name if det.entry else None,
                "sha256": det.entry.sha256 if det.entry else None,
                "scheme": det.config.get("scheme"),
            },
            "data": [str(d) for d in data],
            "n_images": len(rows),
            "n_skipped": len(skipped),
            "evidence_in_lung": share_summary(
                [float(r["lung_share"]) for r in explained], [float(r["lung_area"]) for r in explained]
            ),
        },
        n_boot=n_boot,
    )

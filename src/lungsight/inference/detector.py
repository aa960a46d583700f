"""``Detector``: a study in, a patient decision with its evidence out.

Steps: slice selection (paper 002) -> per-slice probabilities, computed batch by batch so that a long series never
exists as model input all at once -> every slice -> patient rule -> Grad-CAM on the top-k slices by positive-class
probability (the slices that drive a positive decision, and the most suspicious ones of a negative one).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import nn

from lungsight.about import DISCLAIMER, __version__
from lungsight.cores import spare_core
from lungsight.errors import InputContractError
from lungsight.explain.gradcam import GradCAM, finish_maps
from lungsight.inference.rules import RULES, apply_all_rules
from lungsight.io.contract import view_kind, view_position
from lungsight.models.pretrained import ModelEntry, load_model
from lungsight.preprocess.selection import SliceSelection, select_slices
from lungsight.preprocess.transforms import model_batch, unfit_square, windowed_model_batch
from lungsight.preprocess.window import LUNG_WINDOW, to_unit, unit_bounds
from lungsight.study import Study

T = TypeVar("T")


@dataclass
class Evidence:
    """One explained slice or X-ray: the grey image, its Grad-CAM map (same resolution), and for X-rays the lung
    mask drawn as an outline and facts such as the share of the map inside it (``extra``)."""

    index: int
    label: str
    p: float
    slice01: np.ndarray
    cam: np.ndarray
    mask: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prediction:
    """The outcome of :meth:`Detector.predict`; ``result`` is exactly what ``result.json`` holds."""

    result: dict[str, Any]
    evidence: list[Evidence] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.result["decision"]["label"]

    @property
    def probabilities(self) -> dict[str, float]:
        return self.result["probabilities"]

    def save(self, out_dir: str | Path) -> Path:
        """Write result.json, report.html, overlays/ and the slice-probability chart; returns the report's path."""
        from lungsight.inference.outputs import write_outputs

        return write_outputs(self, Path(out_dir))

    def __repr__(self) -> str:
        d = self.result["decision"]
        probs = ", ".join(f"{k}={v:.3f}" for k, v in self.probabilities.items())
        if "slices" in self.result:
            s = self.result["slices"]
            tail = f"slices kept {len(s['selected'])}/{s['n_total']}"
        else:
            share = self.result.get("evidence", {}).get("lung_share")
            tail = f"evidence in lungs {'n/a' if share is None else f'{share:.2f}'}"
        return f"Prediction(label={self.label!r}, rule={d['rule']!r}, score={d['score']:.3f}, {probs}, {tail})"


def _prefetched(prepare: Callable[[T], Any], chunks: Sequence[T], ahead: bool = True) -> Iterator[tuple[T, Any]]:
    """``(chunk, prepare(chunk))`` in order. With ``ahead``, the next chunk is prepared in a worker thread while
    the caller uses the current one: windowing and resizing (NumPy and torch, which release the GIL) overlap the
    model's forward, and at most two prepared batches exist at a time. That pays only where a core is free
    (:func:`lungsight.cores.spare_core`): with every core running the model's threads, the worker competes with
    them (on 2 cores, for 100 slices of 512 x 512: 1.44 s with the worker against 1.21 s without in one run,
    1.22 s against 1.21 s in another), so the detector then prepares each batch in turn."""
    if len(chunks) < 2 or not ahead:
        yield from ((c, prepare(c)) for c in chunks)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lungsight-prep") as pool:
        pending = pool.submit(prepare, chunks[0])
        for k, chunk in enumerate(chunks):
            ready = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(prepare, chunks[k + 1])
            yield chunk, ready


class _Waited(Generic[T]):
    """Iterates over ``items``, adding up in ``seconds`` the time spent waiting for each next item: for
    :func:`_prefetched`, the time the caller spent preparing batches or waiting for the worker that prepares them."""

    def __init__(self, items: Iterator[T]) -> None:
        self._items = items
        self.seconds = 0.0

    def __next__(self) -> T:
        t = time.perf_counter()
        try:
            return next(self._items)
        finally:
            self.seconds += time.perf_counter() - t

    def __iter__(self) -> _Waited[T]:
        return self


def _rows(pixels: np.ndarray, idx: list[int]) -> np.ndarray:
    """``pixels[idx]``, as a view without a copy when ``idx`` is a run of consecutive slices (the usual batch)."""
    if idx and idx[-1] - idx[0] == len(idx) - 1 and all(b == a + 1 for a, b in pairwise(idx)):
        return pixels[idx[0] : idx[-1] + 1]
    return pixels[idx]


class Detector:
    """A trained slice classifier with its input contract and patient-decision settings.

    >>> d = Detector.from_pretrained("ct-default")   # doctest: +SKIP
    >>> d.predict(lungsight.load_study("series/"))    # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, config: dict[str, Any], entry: ModelEntry | None = None) -> None:
        self.model = model.eval()
        self.config = config
        self.entry = entry
        self.classes: list[str] = list(config["classes"])
        self.positive = self.classes.index(config["positive_class"])

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "ct-default") -> Detector:
        """Load a named model (bundled, imported or downloadable) or a ``.safetensors`` model file."""
        model, config, entry = load_model(name_or_path)
        return cls(model, config, entry)

    @property
    def window(self) -> tuple[float, float]:
        """The (low, high) HU this model's CT slices are windowed to: its config's, else the lung window."""
        lo, hi = self.config.get("window", LUNG_WINDOW)
        return float(lo), float(hi)

    def inputs(self, unit: np.ndarray) -> torch.Tensor:
        """Grey slices in [0, 1] ``(N, H, W)`` -> the normalised tensor this model was trained on."""
        c = self.config
        return model_batch(unit, c["input_size"], c["in_chans"], tuple(c["mean"]), tuple(c["std"]))

    def windowed_inputs(self, values: np.ndarray, bounds: tuple[float, float]) -> torch.Tensor:
        """Stored values ``(N, H, W)`` and the study's window bounds (:func:`~lungsight.preprocess.window.unit_bounds`)
        -> the model's input: ``inputs(to_unit(values, bounds=bounds))`` up to float rounding, in fewer passes."""
        c = self.config
        return windowed_model_batch(values, bounds, c["input_size"], c["in_chans"], tuple(c["mean"]), tuple(c["std"]))

    @torch.inference_mode()
    def _softmax(self, x: torch.Tensor) -> np.ndarray:
        return torch.softmax(self.model(x), dim=1).numpy()

    def slice_probabilities(self, unit_slices: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """Softmax ``(N, classes)`` for grey slices in [0, 1] of shape ``(N, H, W)``."""
        out = [
            self._softmax(self.inputs(unit_slices[i : i + batch_size])) for i in range(0, len(unit_slices), batch_size)
        ]
        return np.concatenate(out) if out else self._empty()

    def image_probabilities(self, images: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """Softmax ``(N, classes)`` for single grey images in [0, 1] that may differ in size."""
        out = [
            self._softmax(torch.cat([self.inputs(u[None]) for u in images[i : i + batch_size]]))
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out) if out else self._empty()

    def _empty(self) -> np.ndarray:
        return np.zeros((0, len(self.classes)), np.float32)

    def grad_cam(self) -> GradCAM:
        """Grad-CAM on the model's layer, with its linear head for the shortcut where it has one (explain/gradcam)."""
        return GradCAM(self.model, self.model.cam_layer, getattr(self.model, "linear_head", None))

    def explain(self, unit_slices: np.ndarray, class_idx: int | None = None) -> np.ndarray:
        """Grad-CAM maps of ``class_idx`` (default: the positive class), at the slices' own resolution."""
        cls = self.positive if class_idx is None else class_idx
        with self.grad_cam() as cam:
            maps = cam(self.inputs(unit_slices), cls)
        return unfit_square(maps, unit_slices.shape[1], unit_slices.shape[2])

    def predict(
        self,
        study: Study,
        *,
        rule: str | None = None,
        explain: bool = True,
        top_k: int = 4,
        select: bool = True,
        batch_size: int = 16,
    ) -> Prediction:
        """Classify every slice, decide for the patient by ``rule`` (all rules are reported), explain the top-k.

        An X-ray model (``config["task"] == "cxr"``) classifies the one X-ray instead and measures how much of its
        evidence lies inside the lungs (:func:`lungsight.inference.xray.predict_xray`); ``rule``, ``top_k`` and
        ``select`` do not apply to it.
        """
        if self.config.get("task") == "cxr":
            from lungsight.inference.xray import predict_xray

            return predict_xray(self, study, explain=explain)
        if study.modality != "CT":
            view = view_position(study.metadata.get("ViewPosition"))
            kind = {"lateral": "a lateral X-ray", "oblique": "an oblique X-ray"}.get(view_kind(view) or "", "an X-ray")
            raise InputContractError(
                f"this study is {kind} (modality {study.modality}"
                f"{', view ' + view if view else ''}); the CT model "
                f"{self.config['arch']!r} only reads CT slices (use an X-ray model such as cxr-default)"
            )
        rule = rule or self.config.get("default_rule", "threshold-10")
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
        t0 = time.perf_counter()
        window = self.window
        bounds = unit_bounds(study.pixels, study.intensity, window)  # the whole study's, for every batch
        if select:
            selection = select_slices(study.pixels, study.intensity, spacing=study.spacing)
        else:
            selection = SliceSelection.keep_all(np.zeros(study.n_slices), "none", "selection disabled")
        t_pre = time.perf_counter() - t0
        probs = np.full((study.n_slices, len(self.classes)), np.nan, np.float32)
        t1 = time.perf_counter()
        kept = selection.kept_indices
        batches = [kept[i : i + batch_size] for i in range(0, len(kept), batch_size)]

        def prepare(idx: list[int]) -> torch.Tensor:
            return self.windowed_inputs(_rows(study.pixels, idx), bounds)

        explaining = explain and top_k > 0
        raw_maps: dict[int, torch.Tensor] = {}  # slice -> its raw Grad-CAM map, from the classifying pass
        prepared = _Waited(_prefetched(prepare, batches, ahead=spare_core()))
        with self.grad_cam() if explaining else contextlib.nullcontext() as cam:
            for idx, x in prepared:
                if cam is None:
                    probs[idx] = self._softmax(x)
                    continue
                # One pass classifies and explains: the backward runs through the layers after Grad-CAM's
                # target only (or not at all, with the linear-head shortcut), and the raw maps are tiny, so the
                # slices shown need no second pass.
                logits, raw = cam.logits_and_maps(x, self.positive)
                probs[idx] = torch.softmax(logits, dim=1).numpy()
                raw_maps.update(zip(idx, raw, strict=True))
        t_inf = time.perf_counter() - t1 - prepared.seconds
        p_pos = probs[kept, self.positive]
        kw = {
            "slice_threshold": self.config.get("slice_threshold", 0.5),
            "consecutive_n": self.config.get("consecutive_n", 15),
        }
        negative = self.classes[1 - self.positive] if len(self.classes) == 2 else "not " + self.classes[self.positive]
        rules = {
            name: r.to_dict() | {"label": self.classes[self.positive] if r.positive else negative}
            for name, r in apply_all_rules(p_pos, **kw).items()
        }
        decision = dict(rules[rule])
        mean = probs[kept].mean(axis=0)
        evidence: list[Evidence] = []
        t2 = time.perf_counter()
        if explaining:
            top = [kept[j] for j in np.argsort(-p_pos, kind="stable")[:top_k]]
            unit = to_unit(study.pixels[top], study.intensity, bounds=bounds)
            size = int(self.config["input_size"])
            maps = finish_maps(torch.stack([raw_maps[i] for i in top]), (size, size))
            cams = unfit_square(maps, unit.shape[1], unit.shape[2])
            evidence = [
                Evidence(i, study.slice_labels[i], float(probs[i, self.positive]), unit[k], cams[k])
                for k, i in enumerate(top)
            ]
        t_exp = time.perf_counter() - t2
        entry = self.entry
        result = {
            "lungsight_version": __version__,
            "disclaimer": DISCLAIMER,
            "input": study.summary(),
            "model": {
                "name": entry.name if entry else self.config["arch"],
                "arch": self.config["arch"],
                "sha256": entry.sha256 if entry else None,
                "classes": self.classes,
                "input_size": self.config["input_size"],
            },
            "decision": decision,
            "rules": rules,
            "probabilities": {c: float(mean[k]) for k, c in enumerate(self.classes)},
            "slices": {
                "n_total": study.n_slices,
                "selected": kept,
                "dropped": selection.dropped_indices,
                "selection": selection.to_dict(),
            },
            "slice_probabilities": [
                {
                    "index": i,
                    "label": study.slice_labels[i],
                    "selected": bool(selection.kept[i]),
                    "p": None if np.isnan(probs[i, self.positive]) else float(probs[i, self.positive]),
                }
                for i in range(study.n_slices)
            ],
            "overlays": [],
            "timings_s": {
                "preprocess": t_pre,
                "prepare": prepared.seconds,
                "inference": t_inf,
                "explain": t_exp,
                "total": time.perf_counter() - t0,
            },
            "warnings": list(study.warnings) + ([selection.note] if selection.note else []),
        }
        return Prediction(result, evidence)

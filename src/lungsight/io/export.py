"""A de-identified copy of a study (``lungsight deid``): its pixels and its whitelisted metadata, nothing else.

The copy is built from the :class:`~lungsight.study.Study` that the readers return, so it can hold only what a
Study holds: pixel values and the technical metadata of :mod:`lungsight.io.deid`. No DICOM header, UID, date or
free-text field is carried over, because none is ever read into a Study. Paper 002 converted its DICOM series to
TIFF for the same reason.

* CT in Hounsfield units -> ``study.nii.gz``: the volume in canonical RAS orientation with the voxel spacing,
  ``int16`` when every value is a whole number in range (the usual case), ``float32`` otherwise. Reading it back
  with :func:`lungsight.load_study` gives the same slices in the same order.
* 8- or 16-bit images (X-rays, slice images) -> ``image.png`` for one image, ``slices/slice_0001.png ...`` for
  several, at the bit depth they were read with. Fractional grey levels (from a DICOM VOI LUT, or a folder
  of images of several sizes that the reader resized to one) are rounded.
* ``metadata.json``: the study summary (modality, unit, spacing, whitelisted tags) and what the copy does not
  remove. Input file names appear nowhere in the copy: slices are renumbered in their anatomical order.

Text burned into the pixels (names or dates printed on an image by the scanner or a screenshot) is pixel data and
is **not** removed; ``metadata.json`` says so.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

try:
    from isal import igzip
except ImportError:  # optional, as for reading
    igzip = None

from lungsight.about import __version__
from lungsight.errors import OutputError
from lungsight.fileio import atomic_write, atomic_write_json, ensure_dir
from lungsight.io.nifti import from_display
from lungsight.study import Study

NOT_REMOVED = (
    "text burned into the pixels (printed names, dates or institution) is pixel data and is not removed: "
    "look at the images before sharing them"
)


def write_nifti(pixels: np.ndarray, spacing: tuple[float, float, float] | None, path: Path) -> Path:
    """Write HU slices as a NIfTI volume that :func:`lungsight.load_study` reads back to the same slices.

    ``spacing`` is ``(slice, row, column)`` in mm (1 mm where unknown). Values are stored as ``int16`` when every
    one is a whole number in its range, otherwise as ``float32``. The header carries no free text.
    """
    sp = spacing or (1.0, 1.0, 1.0)
    vol = from_display(pixels)
    whole = np.all(np.isfinite(vol)) and np.array_equal(np.round(vol), vol)
    if whole and vol.min() >= np.iinfo(np.int16).min and vol.max() <= np.iinfo(np.int16).max:
        vol = vol.astype(np.int16)
    else:
        vol = vol.astype(np.float32)
    image = nib.Nifti1Image(vol, np.diag([sp[2], sp[1], sp[0], 1.0]))
    image.header.set_xyzt_units("mm")
    data = image.to_bytes()
    if Path(path).name.lower().endswith(".gz"):
        data = igzip.compress(data, compresslevel=2) if igzip is not None else gzip.compress(data, compresslevel=6)
    return atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))


def write_dicom_series(pixels: np.ndarray, spacing: tuple[float, float, float] | None, folder: Path) -> list[Path]:
    """Write HU slices as an uncompressed CT DICOM series (one file a slice, ``slice_0001.dcm`` ...) that
    :func:`lungsight.load_study` reads back to the same slices, for ``lungsight bench --format dicom``.

    The files hold only what a CT image needs to be read: fresh UIDs, geometry (axial, slices along +z at the
    ``(slice, row, column)`` spacing in mm, 1 mm where unknown), 16-bit signed pixels with the usual rescale
    (intercept -1024), and no patient, study, institution or date attribute. Values are rounded to whole HU and
    clipped to what 16 bits hold.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    sp = spacing or (1.0, 1.0, 1.0)
    ensure_dir(folder)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    stored = np.clip(np.round(pixels + 1024.0), -32768, 32767).astype("<i2")
    written = []
    for k, plane in enumerate(stored):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]  # rows run to the patient's left, columns posterior
        ds.ImagePositionPatient = [0.0, 0.0, round(k * float(sp[0]), 4)]
        ds.PixelSpacing = [float(sp[1]), float(sp[2])]
        ds.SliceThickness = float(sp[0])
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = plane.tobytes()
        path = folder / f"slice_{k + 1:04d}.dcm"
        atomic_write(path, lambda tmp, ds=ds: ds.save_as(tmp, enforce_file_format=True))
        written.append(path)
    return written


def _write_png(plane: np.ndarray, bits: int, path: Path) -> Path:
    top = 255 if bits == 8 else 65535
    grey = np.clip(np.round(plane), 0, top).astype(np.uint8 if bits == 8 else np.uint16)
    return atomic_write(path, lambda tmp: Image.fromarray(grey).save(tmp, format="PNG"))


def export_deidentified(study: Study, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write the de-identified copy of ``study`` into ``out_dir`` (layout in the module docstring).

    Refuses (:class:`~lungsight.errors.OutputError`) to replace files that are already there. Returns the paths
    written, ``metadata.json`` last.
    """
    out = ensure_dir(out_dir)
    if study.intensity == "hu":
        targets = [out / "study.nii.gz"]
    elif study.n_slices == 1:
        targets = [out / "image.png"]
    else:
        targets = [out / "slices" / f"slice_{k:04d}.png" for k in range(1, study.n_slices + 1)]
    existing = [p for p in [*targets, out / "metadata.json"] if p.exists()]
    if existing:
        raise OutputError(f"{existing[0]}: already exists; give an empty --out (nothing was replaced)")
    notes = [NOT_REMOVED]
    if study.intensity == "hu":
        written = [write_nifti(study.pixels, study.spacing, targets[0])]
    else:
        bits = 8 if study.intensity == "grey8" else 16
        if not np.array_equal(np.round(study.pixels), study.pixels):
            notes.append(
                "fractional grey levels (from a DICOM VOI LUT, or images resized to one size) were rounded "
                "to whole levels"
            )
        written = [_write_png(plane, bits, path) for plane, path in zip(study.pixels, targets, strict=True)]
    # The reader's warnings and the other series found are left out: they can quote the input's file names.
    summary = {k: v for k, v in study.summary().items() if k not in ("warnings", "other_series")}
    meta = {
        "deidentified_by": f"lungsight {__version__}",
        "files": [p.relative_to(out).as_posix() for p in written],
        "study": summary,
        "not_removed": notes,
    }
    written.append(atomic_write_json(out / "metadata.json", meta))
    return written

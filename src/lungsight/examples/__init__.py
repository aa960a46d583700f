"""The bundled example study (see NOTICE in this folder for its origin and licence)."""

from importlib import resources
from pathlib import Path

EXAMPLE_CT = Path(str(resources.files("lungsight.examples") / "chest_ct_cropped.nii.gz"))

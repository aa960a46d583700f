"""Errors a user can act on.

Every failure caused by the input (a corrupt file, an unsupported layout, an intensity range the model does not
expect) is raised as a :class:`LungsightError` subclass whose message is one line naming the file and the reason.
The CLI prints that line and exits with a non-zero code instead of a traceback. Messages never contain values read
from patient-identifying DICOM tags.
"""

from __future__ import annotations


class LungsightError(Exception):
    """Base class for errors that are reported to the user as one clear line."""

    exit_code = 2


class InputError(LungsightError):
    """The input cannot be read: missing, corrupt, empty or of an unknown format."""


class UnsupportedInputError(LungsightError):
    """The input is readable but is something lungsight refuses to guess about (gantry tilt, multi-frame ...)."""


#: How to read an image larger than the readers' pixel limit, for the messages that refuse one.
MAX_PIXELS_HINT = "a larger limit: load_study(..., max_pixels=N) in Python, lungsight serve --max-pixels N"


class InputContractError(LungsightError):
    """The pixel values or modality are not what the model expects (e.g. 8-bit display values given as HU)."""


class OutputError(LungsightError):
    """A result, checkpoint or model cannot be written (disk full, no permission, ...)."""

    exit_code = 4


class ModelError(LungsightError):
    """A model or weights file cannot be found, verified or loaded."""

    exit_code = 3


class WeightsUnavailableError(ModelError):
    """Pretrained (e.g. ImageNet) weights cannot be obtained, typically because the machine is offline."""

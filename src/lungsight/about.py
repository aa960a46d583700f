"""Version and the research-use notice that every report carries."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lungsight")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

DISCLAIMER = (
    "Research and triage aid only - not a medical device. lungsight's output has not been cleared or approved "
    "for clinical use and must not be used on its own to diagnose, treat or exclude disease; a qualified "
    "clinician must review every study."
)

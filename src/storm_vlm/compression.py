"""Stable public import path `storm_vlm.compression` (DESIGN.md §3); the code lives in `storm_vlm.model.compression`."""

from storm_vlm.model.compression import *  # noqa: F401,F403
from storm_vlm.model.compression import __all__  # noqa: F401

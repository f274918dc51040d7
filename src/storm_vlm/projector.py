"""Stable public import path `storm_vlm.projector` (DESIGN.md §3); the code lives in `storm_vlm.model.projector`."""

from storm_vlm.model.projector import *  # noqa: F401,F403
from storm_vlm.model.projector import __all__  # noqa: F401

"""Stable public import path `storm_vlm.ssm` (DESIGN.md §3); the code lives in `storm_vlm.model.ssm`."""

from storm_vlm.model.ssm import *  # noqa: F401,F403
from storm_vlm.model.ssm import __all__  # noqa: F401

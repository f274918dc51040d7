"""Selective state-space layers: the selective scan and the Mamba mixers built on it."""

from storm_vlm.model.ssm.scan import selective_scan, selective_scan_reference
from storm_vlm.model.ssm.mixer import BiMambaMixer, MambaMixer, MambaState

__all__ = ["selective_scan", "selective_scan_reference", "MambaMixer", "BiMambaMixer", "MambaState"]

"""The profiler's public import path: measuring in `storm_vlm.perf.profiler`, tables / plots / files
in `storm_vlm.perf.report`, the host and its /proc readings in `storm_vlm.perf.host`."""

from storm_vlm.perf.allocator import tune_cpu_allocator
from storm_vlm.perf.host import measure_cpu_roofline, page_faults
from storm_vlm.perf.profiler import (
    ROW_FIELDS,
    ProfileSettings,
    build_random_model,
    decode_latency,
    load_model_config,
    load_saved_model,
    prefill_video,
    prepare_model,
    profile_model,
    profile_row,
)
from storm_vlm.perf.report import format_table, plot_profile, write_profile

__all__ = [
    "ROW_FIELDS",
    "ProfileSettings",
    "build_random_model",
    "decode_latency",
    "format_table",
    "load_model_config",
    "load_saved_model",
    "measure_cpu_roofline",
    "page_faults",
    "plot_profile",
    "prefill_video",
    "prepare_model",
    "profile_model",
    "profile_row",
    "tune_cpu_allocator",
    "write_profile",
]

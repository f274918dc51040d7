"""Performance tooling beside the model: the latency profiler, the real-size cost model and the
CPU allocator tuning every `storm-vlm` command applies on start."""

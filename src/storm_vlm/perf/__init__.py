"""Performance tooling beside the model: the latency profiler (`profiler`, `report`, `host`; imported
together as `profiling`), the real-size cost model (`costmodel`) and the CPU allocator tuning every
`storm-vlm` command applies on start (`allocator`)."""

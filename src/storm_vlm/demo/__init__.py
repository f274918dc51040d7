"""The demo: STORM vs the VILA baseline on the synthetic temporal-reasoning benchmark, on CPU.

`storm_vlm.demo.runner.run_demo` runs it (`storm-vlm demo` is its command line); `settings`
holds the variants and rows, `synth` / `synth_tasks` generate the benchmark, `tiny` the tiny
random-weight parts every test and smoke run builds on.
"""

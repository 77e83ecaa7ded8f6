"""The project's tools, out of the reading order's way: the speed benchmark (speed.py), the memory
planner and the memory check a CUDA stage runs before it loads its weights (memplan.py), what the two
share (measure.py), and the GPU check (gpu_check.py).

    python -m bench                   # speed against the reference pattern: bench/RESULTS.md
    python -m bench --plan-memory     # peak memory per setting, no GPU needed: bench/MEMORY.md
"""

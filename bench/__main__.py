"""python -m bench: the speed benchmark (bench/speed.py); with --plan-memory, the memory planner."""
from bench import speed

speed.main_guarded()

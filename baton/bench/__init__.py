"""Benchmarks behind `baton bench` and the scripts in benchmarks/; results land in docs/benchmarks/.

Each benchmark has a torch-free options module (its flags, a frozen config, the entry point that
both the CLI and the script call), so `baton --help` stays light, and measuring modules that load
torch, the engine and transformers only when the benchmark runs.
"""

"""Benchmarks: scripts that time, compare and check the framework, one sub-package per job. Every script is run
from the repository root as a module, `python -m benchmarks.<sub>.<name> [--help]`:

- `benchmarks.speed`: speed claims (the fast paths on and off, data-parallel scaling, the engine's overhead);
- `benchmarks.tables`: the generators of the tables and plots published in docs/ (docs/results.md and its PNGs);
- `benchmarks.validation`: checks that a restructuring changes no number (`parity`);
- `benchmarks.pycil`: our iCaRL against PyCIL's (needs a PyCIL checkout; benchmarks/pycil/README.md).

`benchmarks.run.run_config` is the one way a script runs a configuration through main.py and reads its results.
Outputs go to benchmarks/out/ (git-ignored) unless a script says otherwise.
"""

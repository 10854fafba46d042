"""The top layer: a run of a method on a dataset, task by task, with its results, checkpoints and re-tests.

- `task_loop`: THE task loop (before_task -> the task's stages -> after_task -> evaluation), per seed;
- `evaluation`: accuracy of every classifier a method predicts with, inference cost, open-set scores;
- `results`: the run folder, results.json (its only writer), results.csv and plots;
- `resume`: continuing an interrupted run from its checkpoints, and the checks a resume makes;
- `retest`: evaluating the saved models of a finished run again;
- `hooks`: what the engine calls after every epoch (checkpoints, per-epoch evaluation, TensorBoard);
- `guards`: the checks that keep a run from starting on a useless memory or saving a diverged model.

It may import every other package; nothing imports it but main.py (docs/architecture.md).
"""

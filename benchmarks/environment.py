"""What ran a benchmark's numbers, in words: the CPU or GPU model, the precision and the fast paths.

A run records them per seed in results.json (`environment`: one dict per machine the seed ran on, from
`trainer.device.machine(device)` and `Engine.fast_paths()`); a script that times things itself builds the same
dict from the engine it times, `{**machine(engine.device), **engine.fast_paths()}`. `describe` says one such dict
in a line; `common` says the one environment a table's runs share (apart from threads, which a script states
itself), or lists the distinct ones when they do not share one.
"""
from __future__ import annotations

import json

MISSING = "not recorded (a run made before results.json recorded its environment)"


def hardware(env: dict) -> str:
    """The device: CPU model, cores and native bfloat16, or the GPU model and its compute capability."""
    if str(env.get("device", "cpu")).startswith("cuda"):
        return f"GPU {env.get('model')} (compute capability {env.get('cuda_capability')})"
    bf16 = "native bfloat16" if env.get("native_bfloat16") else "no native bfloat16"
    return f"CPU {env.get('model')} ({env.get('cores')} cores, {bf16})"


def precision(env: dict) -> str:
    """The precision and the fast paths: autocast (with gradient scaling), channels-last, processes."""
    if env.get("autocast"):
        text = f"{env['autocast']} autocast over {env.get('precision')} weights"
        text += " with gradient scaling" if env.get("gradient_scaling") else ""
    else:
        text = f"{env.get('precision')}, no autocast"
    text += f", channels-last {'on' if env.get('channels_last') else 'off'}"
    if (env.get("processes") or 1) > 1:
        text += f", {env['processes']} processes (synchronised BN {'on' if env.get('sync_bn') else 'off'})"
    return text


def describe(env: dict | None, threads: bool = True) -> str:
    """One environment in a line: hardware, precision and fast paths, torch version (and threads)."""
    if env is None:
        return MISSING
    text = f"{hardware(env)}, {precision(env)}, torch {env.get('torch')}"
    return text + (f", {_threads([env['threads']])}" if threads and env.get("threads") is not None else "")


def common(envs: list[dict | None], ignore: tuple[str, ...] = ("threads",)) -> str:
    """The environment of a set of runs (their seeds' entries), in a line, with the keys in `ignore` left out (and
    the threads said apart): 'every run: ...' when they share one, else each distinct one with its number of
    seeds."""
    if not envs:
        return "no finished run, no environment"
    distinct: dict[str, tuple[dict | None, int]] = {}
    for env in envs:
        shown = None if env is None else {k: v for k, v in env.items() if k not in ignore}
        key = json.dumps(shown, sort_keys=True)
        distinct[key] = (shown, distinct.get(key, (None, 0))[1] + 1)
    threads = sorted({env.get("threads") for env in envs if env is not None and env.get("threads") is not None})
    thread_text = f"; {_threads(threads)}" if "threads" in ignore and threads else ""
    if len(distinct) == 1:
        return f"every run: {describe(next(iter(distinct.values()))[0], threads=False)}{thread_text}"
    parts = [f"({i}) {n} seed{'' if n == 1 else 's'}: {describe(env, threads=False)}"
             for i, (env, n) in enumerate(distinct.values(), 1)]
    return f"the runs do NOT share one environment, {len(distinct)} distinct: {'; '.join(parts)}{thread_text}"


def _threads(counts: list[int]) -> str:
    if len(counts) > 1:
        return f"threads {', '.join(map(str, counts))}"
    return f"{counts[0]} thread" + ("" if counts[0] == 1 else "s")


def of_runs(results: dict) -> list[dict | None]:
    """Every environment entry of every seed in a results.json (None for a seed that recorded none)."""
    return [env for run in results.get("runs", []) for env in (run.get("environment") or [None])]

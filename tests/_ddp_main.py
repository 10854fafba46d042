"""Worker of tests/test_ddp_main.py, started by torchrun: runs `main.cli` once per command line of a JSON file,
in one process per rank (the imports are paid once), after writing this rank's pid where the test can find it.
Exits with the largest exit status of the runs."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def work(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    with open(os.path.join(spec["pid_dir"], f"rank{os.environ['RANK']}.pid"), "w") as f:
        f.write(str(os.getpid()))
    import main

    return max(main.cli(argv) for argv in spec["runs"])


if __name__ == "__main__":
    sys.exit(work(sys.argv[1]))

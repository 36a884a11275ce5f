"""The main job (`curation-platform demo`, default sizes) on an idle machine and beside CPU-bound work.

Each run uses a fresh project home and a fresh interpreter; ``--load N`` starts N busy-loop processes
for the run's duration (the "other work on the same 2 cores" of a shared VM). Prints one JSON line
per run: wall seconds, the teacher step's seconds, teacher id, the gate's recall, and the release
ids, so idle and loaded runs can be compared for speed and for identical outputs.

    python benchmarks/main_job_load.py --load 0 2 --out /tmp/main-job-bench
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

STEP = re.compile(r"^\s+(ok|FAILED)\s+(\S+) \(([\d.]+) s\)(.*)$")


def busy() -> None:
    while True:
        sum(index * index for index in range(10_000))


def run_demo(home: Path, load: int, env: dict[str, str]) -> dict:
    workers = [multiprocessing.Process(target=busy, daemon=True) for _ in range(load)]
    for worker in workers:
        worker.start()
    started = time.perf_counter()
    try:
        command = [str(Path(sys.executable).parent / "curation-platform"), "demo", "--home", str(home)]
        completed = subprocess.run(command, capture_output=True, text=True, env=env)
    finally:
        for worker in workers:
            worker.terminate()
            worker.join()
    wall = time.perf_counter() - started
    steps = [match.groups() for line in completed.stdout.splitlines() if (match := STEP.match(line))]
    teacher = next((step for step in steps if step[1] == "teacher"), None)
    return {
        "load": load,
        "exit_code": completed.returncode,
        "wall_s": round(wall, 1),
        "teacher_step_s": float(teacher[2]) if teacher else None,
        "teacher_id": re.search(r"teacher (custom-\S+),", teacher[3]).group(1) if teacher else None,
        "gate": next((line for line in completed.stdout.splitlines() if "quality gate" in line), None),
        "release_ids": re.findall(r"^release (\S+):", completed.stdout, flags=re.MULTILINE),
        "runs": len(steps),
        "failed": [step[1] for step in steps if step[0] == "FAILED"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", type=int, nargs="+", default=[0, 2], help="busy processes beside each run")
    parser.add_argument("--out", type=Path, required=True, help="scratch folder for the project homes")
    args = parser.parse_args()

    import torch

    from curation_platform.precision import cpu_precision

    print(json.dumps({"cpu_capability": torch.backends.cpu.get_cpu_capability(), "precision_auto": cpu_precision(),
                      "cores": os.cpu_count(),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(library default)"),
                      "date": time.strftime("%Y-%m-%d")}), flush=True)
    env = {name: value for name, value in os.environ.items() if name not in ("CURATION_HOME", "DAGSTER_HOME")}
    for load in args.load:
        home = args.out / f"load{load}"
        shutil.rmtree(home, ignore_errors=True)
        print(json.dumps(run_demo(home, load, env)), flush=True)


if __name__ == "__main__":
    main()

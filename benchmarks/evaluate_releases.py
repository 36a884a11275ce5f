"""Evaluate every release of a project at one scale (all baselines, several seeds) and time it.

    .venv/bin/python benchmarks/evaluate_releases.py --home curation_home --scale demo --seeds 3

Prints per-run wall time and the leaderboard (docs/evaluation.md's table comes from its output).
"""

from __future__ import annotations

import argparse
import json
import time

from curation_platform.evaluation.evaluate import evaluate_release, project_benchmarks
from curation_platform.evaluation.record import write_leaderboard
from curation_platform.evaluation.scales import get_scale
from curation_platform.layout import ProjectLayout
from curation_platform.precision import cpu_description
from curation_platform.releases import list_releases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", default=None)
    parser.add_argument("--scale", default="demo")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="release names (default: every release)")
    options = parser.parse_args()
    layout = ProjectLayout.resolve(options.home)
    scale = get_scale(options.scale)
    sets = project_benchmarks(layout)
    latest = {}
    for item in list_releases(layout.releases):
        latest[item.name] = item
    started = time.perf_counter()
    print(json.dumps(cpu_description()), flush=True)
    for name, item in sorted(latest.items()):
        if options.only and name not in options.only:
            continue
        run_started = [time.perf_counter()]

        def on_run(run: dict) -> None:
            now = time.perf_counter()
            print(f"{name} {run['arm']} seed {run['seed']} size {run['size']}: {run['metrics']} "
                  f"({now - run_started[0]:.1f} s)", flush=True)
            run_started[0] = now

        evaluated = evaluate_release(item.uri, layout.evaluations, scale, sets, seeds=list(range(options.seeds)),
                                     on_run=on_run)
        print(json.dumps(evaluated.record["summary"], indent=1), flush=True)
    written = write_leaderboard(layout.evaluations)
    print(open(written["markdown"]).read())
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()

"""Ingestion throughput and peak memory for one demo shard of N samples.

    python benchmarks/ingest_shard.py --samples 2000 10000 --workers 2

Each measurement runs in a fresh interpreter so ``ru_maxrss`` is that run's own peak: the parent
(tar streaming, parquet join, outputs) and the decode workers are reported separately. Bounded
memory shows as a peak that does not grow with the shard size.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(pool: str, out: str, workers: int) -> dict:
    from curation_platform.ingest import ingest_pool, write_ingestion
    from curation_platform.pool import discover_shards

    (shard,) = discover_shards(pool)
    started = time.perf_counter()
    for ingestion in ingest_pool([shard], workers=workers):  # the generator shuts its workers down
        write_ingestion(ingestion, out)
        report = ingestion.report
    seconds = time.perf_counter() - started
    return {
        "samples": report.total,
        "accepted": report.accepted,
        "tar_mb": round(shard.tar.size / 1e6, 1),
        "workers": workers,
        "seconds": round(seconds, 2),
        "samples_per_s": round(report.total / seconds, 1),
        "peak_rss_main_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_worker_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[2_000, 10_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--measure", nargs=2, metavar=("POOL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, workers=args.workers)))
        return

    from curation_platform.demo import DemoPoolConfig, build_demo_pool

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as tmp:
        for samples in args.samples:
            demo = Path(tmp, f"demo-{samples}")
            build_demo_pool(DemoPoolConfig(out=demo, shards=1, samples_per_shard=samples, seed=0,
                                           reference_samples=16, target_samples=16, eval_samples=16))
            result = subprocess.run(
                [sys.executable, __file__, "--workers", str(args.workers), "--measure",
                 str(demo / "pool"), str(Path(tmp, f"out-{samples}"))],
                check=True, capture_output=True, text=True,
            )
            print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()

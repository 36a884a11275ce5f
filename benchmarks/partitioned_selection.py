"""Partitioned selection at scale: peak memory per process stays flat as the pool grows.

    python benchmarks/partitioned_selection.py --rows 8000000 32000000 128000000 --compare-up-to 32000000 \\
        --out partitioned_selection.json

For each size a synthetic pool is written to disk as parquet partitions of ``--partition-rows`` rows
(uid as 32 hex digits, ``clip_score``, ``neg_clip_loss``, ``norm_sim_inf`` with 2% NaN and ties from
rounding to 4 decimals, ``language``, ``caption_words``; about 80 bytes a row on disk). Then the
recipes ``clip-score-top30`` and ``basic-negclip-normsim`` (English, >= 3 words, negCLIPLoss top 30%,
NormSim_inf to 20% of the pool) run with :func:`select_partitioned` over the partitions in
``--workers`` worker processes, each recipe in a fresh coordinator interpreter. ``coordinator_peak_mb``
is the coordinator's ``ru_maxrss`` and ``worker_peak_mb`` the largest worker's (``RUSAGE_CHILDREN``).
Up to ``--compare-up-to`` rows the single-process :func:`run_selection` on the whole pool also runs
(in its own interpreter) and the two uid sets are compared byte for byte.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RECIPES = ("clip-score-top30", "basic-negclip-normsim")


def _write_pool(folder: Path, rows: int, partition_rows: int) -> list[str]:
    import numpy as np
    import polars as pl

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, start in enumerate(range(0, rows, partition_rows)):
        path = folder / f"{index:06d}.parquet"
        paths.append(str(path))
        if path.exists():
            continue
        count = min(partition_rows, rows - start)
        rng = np.random.default_rng(index)

        def score(rng: np.random.Generator = rng, count: int = count) -> np.ndarray:
            values = np.round(rng.normal(size=count), 4)
            values[rng.random(count) < 0.02] = np.nan
            return values

        raw = np.frombuffer(rng.bytes(16 * count), dtype="S16")  # NUL bytes survive: pl.Binary keeps lengths
        frame = pl.DataFrame({
            "uid": pl.Series([bytes(item).ljust(16, b"\0") for item in raw], dtype=pl.Binary).bin.encode("hex"),
            "clip_score": score(), "neg_clip_loss": score(), "norm_sim_inf": score(),
            "language": rng.choice(["en", "en", "en", "de"], count), "caption_words": rng.integers(1, 15, count),
        })
        frame.write_parquet(path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    return paths


def _policies(recipe: str):
    from curation_platform.selection import IsIn, Threshold, TopFraction

    if recipe == "clip-score-top30":
        return [TopFraction("clip_score", 0.3)]
    return [IsIn("language", ("en",)), Threshold("caption_words", min=3), TopFraction("neg_clip_loss", 0.3),
            TopFraction("norm_sim_inf", 0.2)]


def _child(mode: str, recipe: str, folder: str, workers: int) -> dict:
    """Run one selection in this interpreter and report its time, memory and the uid digest."""
    from concurrent.futures import ProcessPoolExecutor

    import polars as pl

    from curation_platform.partitioned_selection import select_partitioned
    from curation_platform.processes import worker_context
    from curation_platform.selection import run_selection

    paths = sorted(str(path) for path in Path(folder).glob("*.parquet"))
    digest = _UidDigest()
    started = time.perf_counter()
    if mode == "partitioned":
        partitions = [ParquetPartition(path) for path in paths]
        with ProcessPoolExecutor(workers, mp_context=worker_context()) as executor:
            result = select_partitioned(partitions, _policies(recipe), executor=executor,
                                        on_selected=lambda _, uids: digest.add(uids))
    else:
        result = run_selection(pl.scan_parquet(paths).collect(), _policies(recipe))
        digest.add(result.uids)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 1), "selected": digest.count, "uids_digest": digest.hexdigest(),
            "coordinator_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "worker_peak_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
            if mode == "partitioned" else None,
            "funnel": [stage._asdict() for stage in result.funnel]}


class _UidDigest:
    """An order-free digest of a uid set (XOR of 64-bit hashes, uids being unique) and its size, so the
    partitioned run never gathers its selection to be compared."""

    def __init__(self) -> None:
        self.value, self.count = 0, 0

    def add(self, uids) -> None:
        import numpy as np
        import polars as pl

        hashes = pl.Series(uids.cast("large_string")).hash(seed=7).to_numpy()
        self.value ^= int(np.bitwise_xor.reduce(hashes)) if len(hashes) else 0
        self.count += len(hashes)

    def hexdigest(self) -> str:
        return f"{self.value:016x}-{self.count}"


class ParquetPartition:
    """One parquet file of the synthetic pool (picklable)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self):
        import polars as pl

        return pl.read_parquet(self.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[8_000_000, 32_000_000])
    parser.add_argument("--partition-rows", type=int, default=1_000_000)
    parser.add_argument("--compare-up-to", type=int, default=32_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", default="/tmp/partitioned_selection_pools")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=4, metavar=("MODE", "RECIPE", "FOLDER", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, recipe, folder, workers = args.child
        print(json.dumps(_child(mode, recipe, folder, int(workers))))
        return
    import torch

    results = {"date": dt.date.today().isoformat(),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}",
               "workers": args.workers, "partition_rows": args.partition_rows, "runs": []}
    for rows in args.rows:
        folder = Path(args.data) / f"rows-{rows}"
        started = time.perf_counter()
        _write_pool(folder, rows, args.partition_rows)
        disk = sum(path.stat().st_size for path in folder.glob("*.parquet"))
        print(f"{rows:,} rows: pool written in {time.perf_counter() - started:.0f} s ({disk / 2**30:.1f} GiB)",
              file=sys.stderr)
        for recipe in RECIPES:
            modes = ["partitioned"] + (["single"] if rows <= args.compare_up_to else [])
            run = {"rows": rows, "recipe": recipe, "disk_gib": round(disk / 2**30, 2)}
            for mode in modes:
                output = subprocess.run([sys.executable, __file__, "--child", mode, recipe, str(folder),
                                         str(args.workers)], check=True, capture_output=True, text=True).stdout
                run[mode] = json.loads(output.strip().splitlines()[-1])
                print(f"  {recipe} {mode}: {run[mode]['seconds']} s, coordinator {run[mode]['coordinator_peak_mb']} "
                      f"MB, workers {run[mode]['worker_peak_mb']} MB", file=sys.stderr)
            if "single" in run:
                run["identical"] = run["single"]["uids_digest"] == run["partitioned"]["uids_digest"] and \
                    run["single"]["funnel"] == run["partitioned"]["funnel"]
            run["us_per_row"] = round(run["partitioned"]["seconds"] / rows * 1e6, 2)
            results["runs"].append(run)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

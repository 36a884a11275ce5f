"""Score throughput: queries scored per second for every score family of SCORES.md, and peak memory.

    python benchmarks/score_throughput.py --device cpu --dims 512 768 --out cpu.json     # ~2-3 min, 2 cores
    python benchmarks/score_throughput.py --device cuda --dims 512 768 --out h100.json   # 100k queries each

Inputs are random unit-norm float32 embeddings (seeded) at the issue's realistic sizes: a
reference set of N = 25,000 image/text pairs, negCLIPLoss with B = 32,768 and K = 10 where each
sample's batch is itself plus min(B - 1, N) = 25,000 reference mates (``reference=``), a NormSim
target set of |T| = 100,000 images, a = 100, d = 512 and 768. Tensors are created on the chosen
device and passed as torch tensors, so every score runs (and stays) there.

Families (the function timed, per query):

* ``clip_score``; ``importance_weights`` (raw, a_w = 10)
* ``log_density_ratio`` in both directions (two passes over N)
* ``kl_divergence`` (one ``logit_stats`` pass over N; that pass also yields D_KLR)
* ``whitened_kl`` and ``norm_sim_2``: their ``fit`` (over N and |T|) is timed separately
* ``norm_sim_inf`` against |T| = 100,000 targets
* ``neg_clip_loss`` with K = 10 and reference mates (2 K passes over N per query)
* ``norm_sim_dynamic`` keeping 20% of the queries (10 iterations)

Each (family, d) runs in a fresh interpreter so its peak memory is its own. On CPU it is the
``ru_maxrss`` growth from just after the inputs were built (in place, no transient copies) to the
end, the peak having been reset to the current RSS there (``/proc/self/clear_refs``) so that
imports and input generation do not mask it; on CUDA it is ``torch.cuda.max_memory_allocated``
above the inputs. Fits and warm-up count towards it. Each family is warmed up once on 64 queries,
then timed with ``time.perf_counter`` (``torch.cuda.synchronize`` on CUDA), repeated until
``--min-time`` seconds for the cheap families. ``other_cores`` is the CPU that other processes
used meanwhile (``/proc/stat`` busy time minus this process's), which marks figures taken on a
shared machine: a measurement with ``other_cores`` above ``--contention`` is run again (up to
``--retries`` times) and the fastest attempt kept (all attempts are in the JSON). A last check
(``--memory-check``) runs ``kl_divergence`` with full chunk x chunk blocks at two chunk sizes and
two reference sizes: peak memory follows the chunk, not N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REFERENCE_N = 25_000
TARGET_N = 100_000
BATCH_SIZE = 32_768
REPEATS = 10
A = 100.0  # exp(logit_scale) of OpenAI / LAION CLIP: the functions take a, not log a
DATE = "2026-11-22"
FAMILIES = (
    "clip_score",
    "log_density_ratio",
    "kl_divergence",
    "whitened_kl",
    "norm_sim_2",
    "norm_sim_inf",
    "importance_weights",
    "neg_clip_loss",
    "norm_sim_dynamic",
)
# On CPU the expensive families get a fraction of the queries (their per-query cost does not depend
# on the count once a chunk's fixed costs are amortised) and the O(d) / O(d^2) ones 25 times as many
# (at 2,000 a call takes well under a millisecond and would time Python overhead); on CUDA every
# family gets --queries.
CPU_QUERY_SCALE = {"neg_clip_loss": 1 / 5, "norm_sim_inf": 1 / 2,
                   "clip_score": 25, "importance_weights": 25, "whitened_kl": 25, "norm_sim_2": 25}
WARMUP_QUERIES = 64


# -- measurement (runs in a child interpreter) --------------------------------------------------

def _unit(n: int, d: int, generator, device):
    import torch

    x = torch.empty((n, d), dtype=torch.float32)
    x.normal_(generator=generator)
    x.div_(x.norm(dim=1, keepdim=True))
    return x.to(device)


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> bool:
    """Reset the peak RSS (VmHWM, which ``ru_maxrss`` reports) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _busy_seconds() -> float:
    """CPU seconds all processes spent busy since boot (every core), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _plan(family: str, n: int, d: int, device, chunk: int, reference_n: int, target_n: int):
    """Inputs (built here, on the device), an optional fit, the call to time, and sims per query."""
    import torch

    from curation_platform.scoring import scores

    generator = torch.Generator().manual_seed(d)
    image, text = _unit(n, d, generator, device), _unit(n, d, generator, device)
    needs_reference = family in ("log_density_ratio", "kl_divergence", "whitened_kl", "neg_clip_loss")
    needs_target = family in ("norm_sim_2", "norm_sim_inf")
    ref_image = _unit(reference_n, d, generator, device) if needs_reference else None
    ref_text = _unit(reference_n, d, generator, device) if needs_reference else None
    target = _unit(target_n, d, generator, device) if needs_target else None
    prompt = _unit(1, d, generator, device)[0]
    mates = min(BATCH_SIZE - 1, reference_n)

    fit = None
    if family == "clip_score":
        call, sims = (lambda q, t, s: scores.clip_score(q, t)), 1
    elif family == "log_density_ratio":
        call = lambda q, t, s: scores.log_density_ratio(q, t, A, reference_text=ref_text,  # noqa: E731
                                                        reference_image=ref_image, chunk=chunk)
        sims = 2 * reference_n
    elif family == "kl_divergence":
        call, sims = (lambda q, t, s: scores.kl_divergence(q, ref_text, A, chunk)), reference_n
    elif family == "whitened_kl":
        fit = lambda: scores.WhiteningStats.fit(ref_image, ref_text, chunk)  # noqa: E731
        call, sims = (lambda q, t, s: scores.whitened_kl(q, s, A)), 0
    elif family == "norm_sim_2":
        fit = lambda: scores.TargetStats.fit(target, chunk)  # noqa: E731
        call, sims = (lambda q, t, s: scores.norm_sim_2(q, s)), 0
    elif family == "norm_sim_inf":
        call, sims = (lambda q, t, s: scores.norm_sim_inf(q, target, chunk)), target_n
    elif family == "importance_weights":
        call, sims = (lambda q, t, s: scores.importance_weights(q, prompt, 10.0, "raw")), 1
    elif family == "neg_clip_loss":
        call = lambda q, t, s: scores.neg_clip_loss(q, t, A, BATCH_SIZE, REPEATS, seed=0,  # noqa: E731
                                                    reference=(ref_image, ref_text), chunk=chunk)
        sims = 2 * REPEATS * mates
    elif family == "norm_sim_dynamic":
        call = lambda q, t, s: scores.norm_sim_dynamic(q, keep=max(1, q.shape[0] // 5))  # noqa: E731
        sims = 0
    else:
        raise ValueError(f"unknown family {family!r}")
    return image, text, fit, call, sims


def measure(family: str, n: int, d: int, device_name: str, chunk: int, min_time: float,
            reference_n: int = REFERENCE_N, target_n: int = TARGET_N) -> dict:
    import torch

    device = torch.device(device_name)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    image, text, fit, call, sims = _plan(family, n, d, device, chunk, reference_n, target_n)
    sync()
    inputs_mb = torch.cuda.memory_allocated(device) / 2**20 if cuda else _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    peak_reset = cuda or _reset_peak_rss()
    maxrss_before = _maxrss_mb()
    busy_before, own_before, started = _busy_seconds(), _own_seconds(), time.perf_counter()

    fit_seconds = None
    stats = None
    if fit is not None:
        fit()  # warm-up
        sync()
        fit_started = time.perf_counter()
        stats = fit()
        sync()
        fit_seconds = time.perf_counter() - fit_started
    warm = min(n, WARMUP_QUERIES)
    call(image[:warm], text[:warm], stats)
    sync()

    runs, total = 0, 0.0
    while runs == 0 or (total < min_time and runs < 100):
        run_started = time.perf_counter()
        result = call(image, text, stats)
        sync()
        total += time.perf_counter() - run_started
        runs += 1
    del result
    wall = time.perf_counter() - started
    other_cores = (_busy_seconds() - busy_before - (_own_seconds() - own_before)) / wall

    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated(device) / 2**20) - inputs_mb
    else:
        # with the peak reset, maxrss_before is the RSS of the inputs; without it, an earlier peak
        # (imports, input generation) can hide part of the growth
        peak_mb = _maxrss_mb() - maxrss_before
    seconds = total / runs
    return {
        "family": family,
        "d": d,
        "queries": n,
        "chunk": chunk,
        "reference_n": reference_n,
        "target_n": target_n,
        "runs": runs,
        "seconds_per_run": round(seconds, 6),
        "scores_per_s": round(n / seconds, 1),
        "sims_per_query": sims,
        "gsims_per_s": round(sims * n / seconds / 1e9, 3) if sims > 1 else None,
        "fit_seconds": None if fit_seconds is None else round(fit_seconds, 4),
        "inputs_mb": round(inputs_mb, 1),
        "peak_delta_mb": round(peak_mb, 1),
        "peak_reset": peak_reset,
        "other_cores": round(max(0.0, other_cores), 2),
    }


# -- driver -------------------------------------------------------------------------------------

def machine_info(device: str) -> dict:
    import numpy
    import torch

    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with open("/proc/meminfo") as meminfo:
        mem_gib = int(meminfo.readline().split()[1]) / 2**20
    info = {
        "date": DATE,
        "host": platform.node(),
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device).index or 0)
        info["cuda"] = torch.version.cuda
    return info


def _child(args: argparse.Namespace, family: str, n: int, d: int, chunk: int,
           reference_n: int = REFERENCE_N, target_n: int = TARGET_N) -> dict:
    command = [sys.executable, __file__, "--measure", family, str(n), str(d), str(chunk), str(reference_n),
               str(target_n), "--device", args.device, "--min-time", str(args.min_time)]
    attempts = []
    while True:
        result = subprocess.run(command, check=True, capture_output=True, text=True)
        attempts.append(json.loads(result.stdout.strip().splitlines()[-1]))
        if attempts[-1]["other_cores"] <= args.contention or len(attempts) > args.retries:
            break
    best = dict(min(attempts, key=lambda attempt: attempt["seconds_per_run"]))
    best["attempts"] = len(attempts)
    if len(attempts) > 1:
        best["all_attempts"] = [{k: a[k] for k in ("scores_per_s", "peak_delta_mb", "other_cores")} for a in attempts]
    return best


def _queries(args: argparse.Namespace, family: str) -> int:
    if args.device.startswith("cuda"):
        return args.queries
    return max(WARMUP_QUERIES, round(args.queries * CPU_QUERY_SCALE.get(family, 1)))


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


HEADER = ("| d | family | queries | scores/s | sims/query | Gsim/s | fit s | peak mem delta MB | other cores "
          "| tries |\n"
          "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def _row(r: dict) -> str:
    return (f"| {r['d']} | {r['family']} | {r['queries']:,} | {_fmt(r['scores_per_s'])} | "
            f"{_fmt(r['sims_per_query'] or None)} | {_fmt(r['gsims_per_s'], 3)} | {_fmt(r['fit_seconds'], 3)} | "
            f"{_fmt(r['peak_delta_mb'])} | {r['other_cores']:.2f} | {r['attempts']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--queries", type=int, default=None,
                        help="query samples per family (default 2,000 on CPU, 100,000 on CUDA); on CPU "
                             "neg_clip_loss gets 1/5, norm_sim_inf 1/2 and clip_score, importance_weights, "
                             "whitened_kl, norm_sim_2 25x as many")
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 768])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--min-time", type=float, default=0.5, help="repeat cheap calls until this many seconds")
    parser.add_argument("--contention", type=float, default=0.25,
                        help="a measurement during which other processes used more cores than this is retried")
    parser.add_argument("--retries", type=int, default=1, help="retries of a contended measurement (fastest kept)")
    parser.add_argument("--memory-check", action=argparse.BooleanOptionalAction, default=True,
                        help="kl_divergence peak memory at two chunk sizes x two reference sizes (d = first dim)")
    parser.add_argument("--out", type=Path, default=Path("results.json"))
    parser.add_argument("--measure", nargs=6, metavar=("FAMILY", "N", "D", "CHUNK", "REF_N", "TARGET_N"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.measure:
        family, n, d, chunk, reference_n, target_n = args.measure
        print(json.dumps(measure(family, int(n), int(d), args.device, int(chunk), args.min_time,
                                 int(reference_n), int(target_n))))
        return
    if args.queries is None:
        args.queries = 100_000 if args.device.startswith("cuda") else 2_000

    info = machine_info(args.device)
    info["load_before"] = os.getloadavg()
    print(f"# {info['cpu_model']} x {info['cpu_cores']} cores, {info.get('gpu', 'no GPU')}, device {args.device}, "
          f"torch {info['torch']} ({info['torch_threads']} threads), {DATE}; load {info['load_before']}")
    print(f"# N = {REFERENCE_N:,} reference pairs, |T| = {TARGET_N:,} targets, negCLIPLoss B = {BATCH_SIZE:,} "
          f"K = {REPEATS} (mates = {min(BATCH_SIZE - 1, REFERENCE_N):,}), a = {A:g}, chunk = {args.chunk}")
    print(HEADER, flush=True)
    started = time.perf_counter()
    results = []
    for d in args.dims:
        for family in args.families:
            results.append(_child(args, family, _queries(args, family), d, args.chunk))
            print(_row(results[-1]), flush=True)

    memory = []
    if args.memory_check:
        n = 2048 if not args.device.startswith("cuda") else 16_384
        print(f"\n# memory check: kl_divergence, {n:,} queries, d = {args.dims[0]}")
        print("| chunk | reference N | scores/s | peak mem delta MB | other cores | tries |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        chunks = (512, 2048) if not args.device.startswith("cuda") else (1024, 8192)
        for chunk in chunks:
            for reference_n in (REFERENCE_N, 4 * REFERENCE_N):
                r = _child(args, "kl_divergence", n, args.dims[0], chunk, reference_n=reference_n)
                memory.append(r)
                print(f"| {chunk:,} | {reference_n:,} | {_fmt(r['scores_per_s'])} | {_fmt(r['peak_delta_mb'])} | "
                      f"{r['other_cores']:.2f} | {r['attempts']} |", flush=True)

    info["load_after"] = os.getloadavg()
    info["total_seconds"] = round(time.perf_counter() - started, 1)
    print(f"# total {info['total_seconds']} s; load after {info['load_after']}")
    settings = {"reference_n": REFERENCE_N, "target_n": TARGET_N, "batch_size": BATCH_SIZE, "repeats": REPEATS,
                "a": A, "chunk": args.chunk, "queries": args.queries, "min_time": args.min_time,
                "contention": args.contention, "retries": args.retries}
    args.out.write_text(json.dumps({"machine": info, "settings": settings, "results": results,
                                    "memory_check": memory}, indent=2) + "\n")
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()

"""Teacher training step time by precision and torch threads, on an idle and on a loaded machine.

Each configuration runs in a fresh interpreter: the demo teacher's model (``ModelConfig()``), a
batch of 128 pairs at 64 px, ``--warmup`` untimed steps, then ``--steps`` timed ones. ``--load N``
starts N CPU-bound busy-loop processes beside it (the "other work on the same cores" of a shared
VM) and stops them afterwards. It also trains a few steps with every thread count and reports
whether the weights are bit-identical across thread counts (what decides if the thread count must
be part of a teacher's reproducibility contract).

    python benchmarks/teacher_threads.py --threads 1 2 --precision fp32 bf16 --load 0 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import time

WORKER = r"""
import hashlib, json, sys, time
import torch
from curation_platform.embedding.loader import PixelNormaliser
from curation_platform.training import TrainingConfig, _optimizer, _train_step, create_model
from curation_platform.teachers import Preprocessing
threads, precision, warmup, steps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
config = TrainingConfig(precision=precision, threads=threads)
model = create_model(config.model)
optimizer = _optimizer(model, config)
normalise = PixelNormaliser(Preprocessing.from_open_clip(config.model.preprocess_cfg()))
generator = torch.Generator().manual_seed(0)
pixels = torch.randint(0, 256, (128, 3, 64, 64), dtype=torch.uint8, generator=generator)
tokens = torch.randint(1, 49000, (128, 32), generator=generator)
times = []
for step in range(warmup + steps):
    started = time.perf_counter()
    _train_step(model, optimizer, normalise(pixels), tokens, precision)
    if step >= warmup:
        times.append(time.perf_counter() - started)
weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:16]
times.sort()
print(json.dumps({"threads": threads, "precision": precision, "median_s": times[len(times) // 2],
                  "min_s": times[0], "max_s": times[-1], "weights": weights}))
"""


def busy() -> None:
    while True:
        sum(index * index for index in range(10_000))


def measure(threads: int, precision: str, warmup: int, steps: int) -> dict:
    output = subprocess.run([sys.executable, "-c", WORKER, str(threads), precision, str(warmup), str(steps)],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--load", type=int, nargs="+", default=[0, 2], help="busy processes beside the run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    import torch

    from curation_platform.precision import cpu_precision

    print(json.dumps({"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "native_bf16": cpu_precision() == "bf16",
                      "torch": torch.__version__, "cores": multiprocessing.cpu_count(),
                      "date": time.strftime("%Y-%m-%d")}))
    for load in args.load:
        workers = [multiprocessing.Process(target=busy, daemon=True) for _ in range(load)]
        for worker in workers:
            worker.start()
        try:
            for precision in args.precision:
                results = [measure(threads, precision, args.warmup, args.steps) for threads in args.threads]
                identical = len({result["weights"] for result in results}) == 1
                for result in results:
                    print(json.dumps({"load": load, **result, "weights_identical_across_threads": identical}),
                          flush=True)
        finally:
            for worker in workers:
                worker.terminate()
                worker.join()


if __name__ == "__main__":
    main()

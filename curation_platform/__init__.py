"""Open data platform for curating image-text pretraining sets."""

import os
import sys

__version__ = "0.1.0"

# OpenMP threads that spin while waiting collapse when other processes share the cores (a 2-core VM
# with other work: a teacher training step 0.35 s idle, 1.07 s median and 3.4 s worst loaded); passive
# waiting costs ~8% idle and holds 0.61 s loaded (BENCHMARKS.md). It must be set before torch loads
# its OpenMP runtime, so only then; a value the user set is kept.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

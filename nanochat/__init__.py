"""
nanochat: a small ChatGPT-style model, trained end to end in plain PyTorch.

Importing the package sets OMP_WAIT_POLICY=PASSIVE (unless already set) before torch loads, because torch's
OpenMP threads otherwise spin while they wait: when anything else runs on the machine (another rank, a test,
the Dagster daemon), the spinning threads starve the working ones and a 2-thread training step ran 3x slower
(nanochat.bench train: 374 vs 1,169 tok/s on a busy 2-core EPYC). Set OMP_WAIT_POLICY=ACTIVE to opt out.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

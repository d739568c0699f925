"""
nanochat: a small ChatGPT-style model, trained end to end in plain PyTorch.

Importing the package sets OMP_WAIT_POLICY=PASSIVE (unless already set) before torch loads. torch's OpenMP threads
otherwise spin while they wait, and two torch processes sharing the cores (torchrun ranks on a CPU, a test next to
a training run, the app beside an eval) then starve each other. Measured with nanochat.bench train on a 2-core
EPYC, two such processes at 2 threads each: 1,020 tok/s each with PASSIVE, 669 with ACTIVE, and 374 with the
default policy under a busy test run. Alone on a quiet machine ACTIVE is ~12% faster: set OMP_WAIT_POLICY=ACTIVE
for a process that has the machine to itself.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

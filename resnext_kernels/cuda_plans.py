"""``python -m resnext_kernels.cuda_plans``: the command-line entry of
resnext_kernels.bench.plans (the CUDA kernel's candidate tile plans, listed or
timed); see that module for what it does."""

import sys

from .bench.plans import main

if __name__ == "__main__":
    sys.exit(main())

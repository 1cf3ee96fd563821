"""``python -m resnext_kernels.bench_report``: the command-line entry of
resnext_kernels.bench.report (markdown tables from benchmark JSON files); see
that module for what it does."""

import sys

from .bench.report import main

if __name__ == "__main__":
    sys.exit(main())

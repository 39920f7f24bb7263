"""Registers, spills, shared memory and CTAs per SM of every Triton launch configuration, compiled ahead
of time for a GPU architecture (no GPU needed): writes benchmarks/results/aot_kernels_sm<ARCH>.{md,json}.

    python -m benchmarks.aot_table [--arch 90] [--subset]      (exit status 1 when a configuration spills)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gsa_kernels.triton_aot import table_main

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--subset", action="store_true")
    opts = parser.parse_args(argv)
    stem = RESULTS / f"aot_kernels_sm{opts.arch}"
    return table_main(["--arch", str(opts.arch), "--out", str(stem)] + (["--subset"] if opts.subset else []))


if __name__ == "__main__":
    sys.exit(main())

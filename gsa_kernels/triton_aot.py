"""Compile every Triton kernel of the package for GPU architectures, without a GPU.

Triton lowers to PTX and runs ptxas for any target on a CPU-only machine, so CI (which has no GPU)
still proves that the kernels it tests under TRITON_INTERPRET=1 also compile for the A100 (sm_80),
L40S / RTX 4090 (sm_89) and H100 (sm_90), and reports each kernel's shared memory against the SM's
limit. Each Triton module lists its launch configurations in an `aot_cases()` generator of
(kernel, {arg: type or constexpr value}) pairs.

    python -m gsa_kernels.triton_aot [--arch 80 89 90]      (must run without TRITON_INTERPRET)
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

MODULES = ["gsa_kernels.gaussian.triton_gaussian", "gsa_kernels.mixture.triton_mixture"]
# Compute capability -> the most shared memory one block may use (CUDA programming guide, per-SM limits).
SHARED_BYTES_PER_BLOCK = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DEFAULT_ARCHS = sorted(SHARED_BYTES_PER_BLOCK)


def compile_case(kernel, args: dict, arch: int = 90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    args = dict(args)
    options = {"num_warps": args.pop("num_warps")} if "num_warps" in args else {}
    names = [p.name for p in kernel.params]
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    missing = set(names) - set(args)
    if missing:
        raise ValueError(f"{kernel.__name__}: no type or value for {sorted(missing)}")
    signature = {n: ("constexpr" if n in constexpr_names else args[n]) for n in names}
    constexprs = {n: args[n] for n in names if n in constexpr_names}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=DEFAULT_ARCHS, choices=DEFAULT_ARCHS,
                        help="compute capabilities to compile for (default: all)")
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    results = []
    for mod_name in MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        cases = getattr(mod, "aot_cases", None)
        if cases is None:
            continue
        for kernel, args in cases():
            for arch in opts.arch:
                compiled = compile_case(kernel, args, arch)
                results.append({"kernel": kernel.__name__, "module": mod_name, "arch": arch,
                                "shared_bytes": compiled.metadata.shared,
                                "shared_limit": SHARED_BYTES_PER_BLOCK[arch], "num_warps": compiled.metadata.num_warps,
                                "constexprs": {k: str(v) for k, v in args.items()
                                               if not str(v).startswith(("*", "i32"))}})
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

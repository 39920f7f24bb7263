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

MODULES = ["gsa_kernels.gaussian.triton_gaussian", "gsa_kernels.mixture.triton_mixture",
           "gsa_kernels.mixture.triton_mixture_vjp", "gsa_kernels._core.triton_lse"]
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


# ---------------------------------------------------------------------------------------------
# Resource table: the configurations real launches get, specialised as real launches are, with each
# compiled kernel's registers, spills, shared memory and resident CTAs per SM read from its cubin.

# Integer arguments that real launches pass as multiples of 16 (d of image data, point counts per split);
# Triton specialises those (tt.divisibility = 16) as it does the 16-byte-aligned pointers of fresh
# contiguous tensors.
DIVISIBLE_INTS = frozenset({"D", "N", "n_per_split", "k_per_split"})
# Shared memory per SM available to CTAs (bytes) by architecture.
SHARED_PER_SM = {80: 167936, 86: 102400, 89: 102400, 90: 233472}


def launch_attrs(kernel, args: dict) -> dict:
    """Triton's specialisation attributes of a real launch: every pointer and DIVISIBLE_INTS divisible by 16."""
    attrs = {}
    for i, p in enumerate(kernel.params):
        ty = args.get(p.name)
        if not p.is_constexpr and isinstance(ty, str) and (ty.startswith("*") or p.name in DIVISIBLE_INTS):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def compile_launch_case(kernel, args: dict, arch: int = 90):
    """compile_case with the specialisation of a real launch of contiguous tensors."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    args = dict(args)
    options = {"num_warps": args.pop("num_warps")} if "num_warps" in args else {}
    names = [p.name for p in kernel.params]
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    signature = {n: ("constexpr" if n in constexpr_names else args[n]) for n in names}
    constexprs = {n: args[n] for n in names if n in constexpr_names}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=launch_attrs(kernel, args))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def cubin_resources(compiled) -> dict:
    """Registers, local memory (spills) and static shared memory per thread / CTA, from cuobjdump."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in fields.items()}


def resource_row(kernel, args: dict, arch: int) -> dict:
    from ._core.launch import ctas_per_sm

    compiled = compile_launch_case(kernel, args, arch)
    res = cubin_resources(compiled)
    shared = int(compiled.metadata.shared) + res.get("shared", 0)
    warps = int(compiled.metadata.num_warps)
    return {"kernel": kernel.__name__, "arch": f"sm_{arch}", "num_warps": warps,
            "config": {k: str(v) for k, v in args.items() if k != "num_warps" and not str(v).startswith(("*", "i32"))},
            "types": ",".join(sorted({str(v) for v in args.values() if str(v).startswith("*")})),
            "registers": res.get("reg", 0), "spill_bytes": res.get("local", 0) + res.get("stack", 0),
            "shared_bytes": shared,
            "ctas_per_sm": ctas_per_sm(res.get("reg", 0), warps, shared, shared_per_sm=SHARED_PER_SM.get(arch, 0))}


def resource_table(arch: int = 90, full: bool = True) -> list[dict]:
    """One row per launch configuration of every module (aot_cases(full))."""
    rows, seen = [], set()
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for kernel, args in mod.aot_cases(full):
            key = (kernel.__name__, repr(sorted((k, str(v)) for k, v in args.items())))
            if key not in seen:  # tile tables may map two keys to one configuration
                seen.add(key)
                rows.append(resource_row(kernel, args, arch))
    return rows


def write_resource_table(rows: list[dict], path_stem: str) -> None:
    """path_stem.json (the data) and path_stem.md (a rendering)."""
    with open(path_stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["| kernel | config | pointer types | arch | warps | registers | spill bytes | shared bytes | CTAs/SM |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        lines.append(f"| {r['kernel']} | {cfg} | {r['types']} | {r['arch']} | {r['num_warps']} | {r['registers']} | "
                     f"{r['spill_bytes']} | {r['shared_bytes']} | {r['ctas_per_sm']} |")
    with open(path_stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def table_main(argv=None) -> int:
    """python -c 'from gsa_kernels.triton_aot import table_main; table_main()' --arch 90 --out STEM [--subset]:
    writes the resource table; exit status 1 when a configuration spills."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--out", default=None)
    parser.add_argument("--subset", action="store_true", help="the representative subset, not every entry")
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    rows = resource_table(opts.arch, full=not opts.subset)
    if opts.out:
        write_resource_table(rows, opts.out)
    print(json.dumps(rows))
    spilling = [r for r in rows if r["spill_bytes"]]
    for r in spilling:
        print(f"spills: {r['kernel']} {r['config']} {r['spill_bytes']} bytes", file=sys.stderr)
    return 1 if spilling else 0


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

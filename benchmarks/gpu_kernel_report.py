"""Registers, spills and shared memory of the Triton kernels compiled at run time, read from the kernels' caches.

    python -m benchmarks.gpu_kernel_report --json K.json -- MODULE [ARGS...]
        runs `python -m MODULE ARGS...` in this process, then adds every gsa_kernels Triton kernel compiled
        meanwhile (one entry per specialisation) to K.json (entries already there are kept);
    python -m benchmarks.gpu_kernel_report --render K.json
        writes K.md, a table per kernel: registers, spills, shared memory, warps, stages and CTAs per SM.

The kernels are read where Triton keeps them: JITFunction.device_caches[device][0] (Triton 3.x: a dict of
specialisation key -> CompiledKernel; the tuple's other fields changed between 3.3 and 3.6) or the older
JITFunction.cache[device]. A CompiledKernel loads its binary (and learns n_regs / n_spills) on first launch.
"""
from __future__ import annotations

import argparse
import json
import runpy
import signal
import sys
from pathlib import Path

KERNEL_MODULES = ("gsa_kernels.gaussian.triton_gaussian", "gsa_kernels.mixture.triton_mixture",
                  "gsa_kernels._core.triton_lse")


def _jit_functions(module) -> dict:
    """name -> JITFunction of the module's @triton.jit kernels (unwrapping autotune/heuristics)."""
    found = {}
    for name, obj in vars(module).items():
        fn, depth = obj, 0
        while fn is not None and not hasattr(fn, "device_caches") and not hasattr(fn, "cache") and depth < 4:
            fn, depth = getattr(fn, "fn", None), depth + 1
        if fn is not None and (hasattr(fn, "device_caches") or isinstance(getattr(fn, "cache", None), dict)) \
                and hasattr(fn, "src"):
            found[name] = fn
    return found


def _compiled(fn) -> list:
    """(device, key, CompiledKernel) for every specialisation `fn` compiled."""
    out = []
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        for device, entry in list(caches.items()):
            cache = entry[0] if isinstance(entry, tuple) else entry
            out += [(device, key, k) for key, k in list(cache.items())]
    else:
        for device, cache in list(getattr(fn, "cache", {}).items()):
            out += [(device, key, k) for key, k in list(cache.items())]
    return out


def _field(meta, name):
    if isinstance(meta, dict):
        return meta.get(name)
    return getattr(meta, name, None)


def _ctas_per_sm(n_regs, num_warps, shared, props) -> int | None:
    """Resident CTAs per SM (gsa_kernels._core.launch.ctas_per_sm) with the device's limits."""
    from gsa_kernels._core.launch import ctas_per_sm

    if not n_regs or not num_warps or props is None:
        return None
    return ctas_per_sm(n_regs, num_warps, shared or 0, regs_per_sm=props.get("regs_per_sm") or 65536,
                       shared_per_sm=props.get("shared_per_sm") or 0,
                       threads_per_sm=props.get("threads_per_sm") or 2048)


def collect(props: dict | None = None) -> list[dict]:
    """One row per compiled specialisation of every gsa_kernels Triton kernel in this process."""
    import importlib

    rows = []
    for mod_name in KERNEL_MODULES:
        try:
            module = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name, fn in _jit_functions(module).items():
            for device, key, kernel in _compiled(fn):
                if hasattr(kernel, "result") and not hasattr(kernel, "metadata"):  # an async compile's future
                    kernel = kernel.result()
                if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
                    kernel._init_handles()  # loads the binary: that is where n_regs / n_spills come from
                meta = getattr(kernel, "metadata", None)
                n_regs, num_warps, shared = getattr(kernel, "n_regs", None), _field(meta, "num_warps"), \
                    _field(meta, "shared")
                rows.append({"module": mod_name.rsplit(".", 1)[-1], "kernel": name, "device": str(device),
                             "n_regs": n_regs, "n_spills": getattr(kernel, "n_spills", None),
                             "shared_bytes": shared, "num_warps": num_warps,
                             "num_stages": _field(meta, "num_stages"),
                             "ctas_per_sm": _ctas_per_sm(n_regs, num_warps, shared, props),
                             "key": str(key)})
    return rows


def device_props() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": p.name, "sm_count": p.multi_processor_count,
            "regs_per_sm": getattr(p, "regs_per_multiprocessor", None),
            "shared_per_sm": getattr(p, "shared_memory_per_multiprocessor", None),
            "threads_per_sm": getattr(p, "max_threads_per_multi_processor", None)}


def merge_into(path: Path, rows: list[dict], props: dict | None) -> dict:
    payload = json.loads(path.read_text()) if path.is_file() else {"device": props, "kernels": []}
    seen = {(r["kernel"], r["key"]) for r in payload["kernels"]}
    payload["kernels"] += [r for r in rows if (r["kernel"], r["key"]) not in seen]
    payload["device"] = payload.get("device") or props
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return payload


def markdown(payload: dict) -> str:
    dev = payload.get("device") or {}
    rows = payload["kernels"]
    lines = [f"# Triton kernels compiled at run time: {dev.get('name', 'no CUDA device')}", ""]
    if not rows:
        lines.append("No compiled kernels (no CUDA device, or the Triton interpreter was active).")
        return "\n".join(lines) + "\n"
    spilling = [r for r in rows if r["n_spills"]]
    lines += [f"{len(rows)} specialisations of {len({r['kernel'] for r in rows})} kernels; "
              f"{len(spilling)} with register spills. CTAs/SM: resident blocks per SM from registers, "
              f"shared memory and threads ({dev.get('sm_count', '?')} SMs).", "",
              "| kernel | registers | spills | shared memory (B) | warps | stages | CTAs/SM | specialisation |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["module"], r["kernel"], r["key"])):
        key = r["key"] if len(r["key"]) <= 120 else r["key"][:117] + "..."
        lines.append(f"| {r['module']}.{r['kernel']} | {r['n_regs']} | {r['n_spills']} | {r['shared_bytes']} | "
                     f"{r['num_warps']} | {r['num_stages']} | {r['ctas_per_sm']} | `{key.replace('|', '/')}` |")
    return "\n".join(lines) + "\n"


def _run_module(argv: list[str]) -> int:
    """Run `python -m argv[0] argv[1:]` here; a SIGTERM (a stage's timeout) ends it like Ctrl-C, so the
    kernels compiled so far are still reported."""
    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    saved = sys.argv
    sys.argv = list(argv)
    try:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        print(f"{argv[0]}: interrupted (time limit); reporting the kernels compiled so far", file=sys.stderr)
        return 124
    finally:
        sys.argv = saved


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    inner = []
    if "--" in argv:
        i = argv.index("--")
        argv, inner = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_kernel_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="kernel table JSON to add this run's kernels to")
    p.add_argument("--render", metavar="JSON", help="write the markdown table of a kernel JSON next to it")
    args = p.parse_args(argv)
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        print(f"wrote {path.with_suffix('.md')}")
        return 0
    if not args.json or not inner:
        p.error("give --json PATH -- MODULE [ARGS...], or --render PATH")
    rc = _run_module(inner)
    props = device_props()
    rows = collect(props)
    payload = merge_into(Path(args.json), rows, props)
    print(f"kernel report: {len(rows)} compiled specialisations in this run, {len(payload['kernels'])} in "
          f"{args.json}")
    return rc


if __name__ == "__main__":
    sys.exit(main())

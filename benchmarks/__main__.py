"""python -m benchmarks: run the microbenchmark suite and write its table, JSON and plot.

The harness (benchmarks/harness/: environment, timing, memory, run loop, report) times the cases of each
op family (benchmarks/cases/: gaussian, mixture, overhead); results are data (results/*.json), rendered
to markdown and a plot.

On a GPU it runs the full GPU shape set; on a CPU a small set (--shapes quick) that takes a few minutes on
2 cores. Results go to benchmarks/results/<device>_<date>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .cases import gaussian, mixture, overhead
from .harness.environment import environment, pick_device
from .harness.report import RESULTS_DIR, markdown, plot, print_overhead_rows, print_rows, result_stem, write_json
from .harness.run import BACKEND_KINDS, SHAPE_SETS, RunOptions, derive, recompute_speedups, run_case
from .harness.timing import PRECISIONS, best_ceilings, measure_ceilings

FAMILIES = {"gaussian": gaussian, "mixture": mixture, "overhead": overhead}


def _csv(text: str, allowed, what: str) -> tuple:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def parse_args(argv):
    all_ops = [op for m in FAMILIES.values() for op in m.OPS]
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="all",
                   help=f"comma list of ops ({', '.join(all_ops)}) or families ({', '.join(FAMILIES)}); "
                        "'all' (default) runs everything, except the overhead family on a CPU")
    p.add_argument("--shapes", choices=SHAPE_SETS, default=None,
                   help="shape set: full (the GPU shapes; default on a GPU), quick (default on a CPU), tiny")
    p.add_argument("--quick", action="store_true", help="same as --shapes quick")
    p.add_argument("--batch", default=None, help="comma list of batch sizes replacing the shape set's")
    p.add_argument("--backends", default=",".join(BACKEND_KINDS), help="comma list of backends to time")
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help="gsa_kernels.config precision modes for the gsa rows (GPU only; a CPU runs ieee)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on a CPU)")
    p.add_argument("--compile-budget", type=float, default=300.0,
                   help="seconds of torch.compile time after which further compile rows are skipped")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of measurement per timing (default 0.1 on a GPU, 0.2 on a CPU)")
    p.add_argument("--sigma", type=float, default=1.0, help="noise level of denoise/score/mixtures; teleport's target")
    p.add_argument("--sigma-from", type=float, default=80.0, help="teleport's starting noise level")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS_DIR), help="output directory")
    p.add_argument("--tag", default=None, help="suffix of the output file names")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="only rewrite the markdown table and the plot of an existing result JSON")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of ops not rerun from an existing result file of the same name "
                        "(to build one table from several shorter runs)")
    return p.parse_args(argv)


def _selected_ops(spec: str, device) -> tuple[list, list]:
    """(ops to run, notes on what the default skips)."""
    notes = []
    if spec == "all":
        ops = [op for name, m in FAMILIES.items() for op in m.OPS if name != "overhead" or device.type == "cuda"]
        if device.type != "cuda":
            notes.append("overhead family skipped: host overhead per call and CUDA-graph replay are GPU "
                         "measurements (run `--ops overhead` for the CPU host time)")
        return ops, notes
    all_ops = [op for m in FAMILIES.values() for op in m.OPS]
    items = _csv(spec, all_ops + list(FAMILIES), "op")
    ops = []
    for item in items:
        ops += list(FAMILIES[item].OPS) if item in FAMILIES else [item]
    return list(dict.fromkeys(ops)), notes


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.render:
        return _render(Path(args.render))
    device = pick_device(args.device)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv, device)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, argv, device) -> dict:
    shape_set = args.shapes or ("quick" if args.quick or device.type != "cuda" else "full")
    opts = RunOptions(
        device=device, shape_set=shape_set,
        min_time=args.min_time or (0.1 if device.type == "cuda" else 0.2),
        backends=_csv(args.backends, BACKEND_KINDS, "backend"),
        precisions=_csv(args.precisions, PRECISIONS, "precision"),
        batches=tuple(int(b) for b in args.batch.split(",")) if args.batch else None,
        sigma=args.sigma, sigma_from=args.sigma_from,
        compile_budget_s=0.0 if args.no_compile else args.compile_budget, seed=args.seed)
    ops, notes = _selected_ops(args.ops, device)

    from gsa_kernels import config

    # Value checks read device memory and synchronise a GPU; the timed calls run without them (the
    # overhead family measures both).
    was_validating = config.validation_enabled()
    config.set_validation(False)
    wall = time.perf_counter()
    try:
        env = environment(device)
        print(f"gsa_kernels benchmarks on {env['device']} (torch {env['torch']}, triton {env['triton']}), "
              f"shapes={shape_set}, ops={','.join(ops)}", flush=True)
        ceilings = measure_ceilings(device, shape_set, opts.min_time, opts.precisions)
        print(f"ceilings: copy {ceilings['copy']['gbps']:.1f} GB/s; matmul "
              + ", ".join(f"{k} {v['tflops']:.3f} TFLOP/s" for k, v in ceilings["matmul"].items()), flush=True)
        rows = []
        for name, module in FAMILIES.items():
            fam_ops = [op for op in module.OPS if op in ops]
            if not fam_ops:
                continue
            why = module.available()
            if why:
                notes.append(f"{name} family skipped: {why}")
                print(f"[{name}] skipped: {why}", flush=True)
                continue
            print(f"[{name}]", flush=True)
            if name == "overhead":
                fam_rows = module.run(opts, fam_ops)
                print_overhead_rows(fam_rows)
                rows += fam_rows
                continue
            first = True
            for case in module.cases(opts, fam_ops):
                case_rows = run_case(case, opts, ceilings)
                print_rows(case_rows, header=first)
                first = False
                rows += case_rows
        # Ceilings again at the end; the better of the two is kept (load on a shared machine varies).
        ceilings_end = measure_ceilings(device, shape_set, opts.min_time, opts.precisions)
        measured_ceilings = [ceilings, ceilings_end]
        ceilings = best_ceilings(ceilings, ceilings_end)
        for row in rows:
            if row["family"] != "overhead" and row["status"] == "ok":
                derive(row, ceilings)
    finally:
        config.set_validation(was_validating)
    if device.type != "cuda":
        notes.append("CPU run: the gsa rows time the C++ CPU kernels; GPU precision modes (tf32x3, tf32), "
                     "CUDA-graph timings and GPU tuning need a GPU run.")
    payload = {
        "env": env,
        "options": {"shape_set": shape_set, "ops": ops, "backends": list(opts.backends),
                    "precisions": list(opts.precisions), "batches": opts.batches, "sigma": opts.sigma,
                    "sigma_from": opts.sigma_from, "min_time": opts.min_time,
                    "compile_budget_s": opts.compile_budget_s, "compile_spent_s": opts.compile_spent_s,
                    "seed": opts.seed},
        "command": "python -m benchmarks " + " ".join(argv),
        "ceilings": ceilings,
        "ceilings_start_end": measured_ceilings,
        "rows": rows,
        "notes": notes,
        "wall_s": time.perf_counter() - wall,
    }
    for note in notes:
        print(f"note: {note}")
    if not args.no_write:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = out_dir / result_stem(env, args.tag)
        if args.merge and stem.with_suffix(".json").is_file():
            _merge(payload, json.loads(stem.with_suffix(".json").read_text()))
        write_json(stem.with_suffix(".json"), payload)
        stem.with_suffix(".md").write_text(markdown(payload))
        written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
        if not args.no_plot and plot(payload, stem.with_suffix(".png")):
            written.append(stem.with_suffix(".png"))
        payload["files"] = [str(p) for p in written]
        print("wrote " + ", ".join(os.path.relpath(p) for p in written))
    print(f"total {payload['wall_s']:.0f} s")
    return payload


def _render(path: Path) -> dict:
    payload = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown(payload))
    plot(payload, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.md')}, {path.with_suffix('.png')}")
    return payload


def _row_key(r: dict) -> tuple:
    return r["family"], r["op"], r["config_str"], r["batch"], r["backend"]


def _merge(payload: dict, earlier: dict) -> None:
    """Keep the earlier file's rows that this run did not measure (same op, shape, batch and backend),
    then recompute the speedups across both. The kept rows' percentages refer to their own run's
    ceilings, which are kept under 'merged_runs'."""
    measured = {_row_key(r) for r in payload["rows"]}
    kept = [r for r in earlier["rows"] if _row_key(r) not in measured]
    if not kept:
        return
    rows = earlier["rows"] + payload["rows"]
    groups = list(dict.fromkeys(_row_key(r)[:4] for r in rows))
    families = list(FAMILIES)

    def position(r):
        kind = BACKEND_KINDS.index(r["kind"]) if r["kind"] in BACKEND_KINDS else len(BACKEND_KINDS)
        return families.index(r["family"]), groups.index(_row_key(r)[:4]), kind, r["backend"]

    payload["rows"] = sorted(kept + payload["rows"], key=position)
    recompute_speedups(payload["rows"])
    runs = earlier.get("merged_runs", []) + [{"time_utc": earlier["env"]["time_utc"], "command": earlier["command"],
                                              "ceilings": earlier["ceilings"]}]
    payload["merged_runs"] = runs
    payload["notes"].append(f"{len(kept)} rows kept from earlier runs ({', '.join(r['time_utc'] for r in runs)}); "
                            "their percentages use those runs' ceilings (see merged_runs in the JSON)")


if __name__ == "__main__":
    main()

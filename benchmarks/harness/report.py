"""Results as data and as text: the printed table, the JSON file, the markdown table and the plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


# Output: printed table, JSON, markdown, plot
def fmt_time(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt(v, spec, suffix=""):
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _fmt_mem(v):
    return "-" if v is None else f"{v / 2**20:.2f}"


TABLE_COLUMNS = [
    ("op", lambda r: r["op"]),
    ("shape", lambda r: r["config_str"]),
    ("B", lambda r: str(r["batch"])),
    ("backend", lambda r: r["backend"]),
    ("median", lambda r: fmt_time(r["median_s"])),
    ("TFLOP/s", lambda r: _fmt(r["tflops"], ".3f")),
    ("GB/s", lambda r: _fmt(r["gbps"], ".1f")),
    ("%BW", lambda r: _fmt(r["pct_bw"], ".0f")),
    ("%FLOP", lambda r: _fmt(r["pct_flops"], ".0f")),
    ("%roof", lambda r: _fmt(r["roofline_pct"], ".0f")),
    ("extra MiB", lambda r: _fmt_mem(r["peak_extra_bytes"])),
    ("mem/io", lambda r: _fmt(r["mem_vs_io"], ".2f")),
    ("rel err", lambda r: _fmt(r["rel_err"], ".1e")),
    ("x eager", lambda r: _fmt(r["speedup_vs_eager"], ".2f")),
    ("x compile", lambda r: _fmt(r["speedup_vs_compile"], ".2f")),
    ("x papers", lambda r: _fmt(r["speedup_vs_papers"], ".2f")),
    ("/matmuls", lambda r: _fmt(r["vs_matmuls"], ".2f")),
    ("graph", lambda r: fmt_time(r["graph_s"])),
]


def _cells(row):
    if row["status"] != "ok":
        head = [fn(row) for _, fn in TABLE_COLUMNS[:4]]
        return head + [f"{row['status']}: {row['reason']}"] + [""] * (len(TABLE_COLUMNS) - 5)
    return [fn(row) for _, fn in TABLE_COLUMNS]


def print_rows(rows, header=False):
    widths = [10, 16, 5, 14, 10, 8, 8, 5, 5, 5, 9, 6, 8, 7, 9, 8, 8, 9]
    if header:
        print("  ".join(name.ljust(w) for (name, _), w in zip(TABLE_COLUMNS, widths)), flush=True)
    for r in rows:
        cells = _cells(r)
        if r["status"] != "ok":
            print("  ".join(c.ljust(w) for c, w in zip(cells[:4], widths)) + "  " + cells[4], flush=True)
        else:
            print("  ".join(c.ljust(w) for c, w in zip(cells, widths)), flush=True)


def result_stem(env: dict, tag: str | None = None) -> str:
    stem = f"{env['device_slug']}_{env['date']}"
    return f"{stem}_{tag}" if tag else stem


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def markdown(payload: dict) -> str:
    env, ceil, rows = payload["env"], payload["ceilings"], payload["rows"]
    lines = [
        f"# gsa_kernels microbenchmarks: {env['device']}, {env['date']}",
        "",
    ]
    if env["device_type"] == "cpu":
        lines += ["**CPU numbers** (small `--shapes " + payload["options"]["shape_set"] + "` set). "
                  "No GPU was available for this run; nothing here is a GPU figure. "
                  "The backends of each case are timed in turns (5 rounds), so the ratios (x eager, /matmuls) "
                  "hold while the load of a shared machine drifts; the absolute times move with it.", ""]
    lines += [
        "| | |", "|---|---|",
        f"| device | {env['device']} |",
        f"| date (UTC) | {env['time_utc']} |",
        f"| torch / triton | {env['torch']} / {env['triton']} |",
        f"| gsa_kernels | {env['gsa_kernels']} (commit {env['git_commit']}) |",
        f"| load average at start (1, 5, 15 min) | {', '.join(f'{v:.2f}' for v in env['load_average'] or [])} |",
        f"| command | `{payload['command']}` |",
        f"| wall time | {payload['wall_s']:.0f} s |",
        "",
        "## Ceilings measured in this run",
        "",
        f"- copy bandwidth (device-to-device copy of {ceil['copy']['bytes'] / 2**20:.0f} MiB, read + write): "
        f"**{ceil['copy']['gbps']:.1f} GB/s**",
    ]
    for kind, m in ceil["matmul"].items():
        mode = "TF32" if kind == "tf32" else "IEEE"
        lines.append(f"- float32 matmul {m['n']}^3 ({mode}): **{m['tflops']:.3f} TFLOP/s**")
    lines.append("")
    families = list(dict.fromkeys(r["family"] for r in rows))
    names = [name for name, _ in TABLE_COLUMNS]
    for fam in families:
        if fam == "overhead":
            lines += ["## overhead", ""] + overhead_markdown_table([r for r in rows if r["family"] == fam]) + [""]
            continue
        lines += [f"## {fam}", "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
        for r in (r for r in rows if r["family"] == fam):
            lines.append("| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |")
        lines.append("")
    for note in payload.get("notes", []):
        lines.append(f"- {note}")
    lines += ["", "Columns: " + COLUMN_NOTES, ""]
    return "\n".join(lines)


COLUMN_NOTES = (
    "median = median time per call; TFLOP/s and GB/s from the op's FLOPs and minimal bytes (each input byte "
    "read once, output written once); %BW / %FLOP = percent of the copy bandwidth / matmul throughput measured "
    "in this run (TF32 ceiling for tf32 rows); %roof = the roofline time max(bytes/BW, FLOPs/peak) over the "
    "median; extra MiB = peak memory allocated during one call beyond what was allocated before it, output "
    "included; mem/io = (inputs + extra) / (inputs + outputs); rel err = ||out - ref|| / ||ref|| against the "
    "float64 reference on the first rows; x eager / x compile / x papers = that backend's time over this row's "
    "(higher: this row faster); /matmuls = this row's time over the bare matmuls the op needs (same precision; "
    "TF32 for tf32x3); graph = device time per call replayed in a CUDA graph (GPU only)."
)


def plot(payload: dict, path: Path) -> bool:
    """Time against batch size, one panel per op and non-batch shape, one line per backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in payload["rows"] if r["status"] == "ok" and r["family"] != "overhead"]
    panels = list(dict.fromkeys((r["family"], r["op"], r["config_str"]) for r in rows))
    if not panels:
        return False
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow), squeeze=False)
    for ax, (fam, op, cfg) in zip(axes.flat, panels):
        sub = [r for r in rows if (r["family"], r["op"], r["config_str"]) == (fam, op, cfg)]
        for name in dict.fromkeys(r["backend"] for r in sub):
            pts = sorted((r["batch"], r["median_s"]) for r in sub if r["backend"] == name)
            ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=name,
                    linestyle="--" if name.startswith(("matmuls", "papers")) else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{op}  {cfg}", fontsize=9)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("median time (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    env = payload["env"]
    fig.suptitle(f"gsa_kernels microbenchmarks: {env['device']}, {env['date']} (torch {env['torch']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=75)
    plt.close(fig)
    return True


# Overhead rows (host time per call at B = 1) have their own columns.
def print_overhead_rows(rows) -> None:
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['backend']:<22} {r['status']}: {r['reason']}", flush=True)
            continue
        parts = [f"  {r['backend']:<22}"]
        if r["host_s"] is not None:
            parts.append(f"host {r['host_s'] * 1e6:8.1f} us/call")
        if r["median_s"] is not None:
            parts.append(f"latency {r['median_s'] * 1e6:8.1f} us/call")
        if r["graph_s"] is not None:
            parts.append(f"device {r['graph_s'] * 1e6:8.1f} us/replay")
        if r["note"]:
            parts.append(r["note"])
        print("  ".join(parts), flush=True)


def overhead_markdown_table(rows) -> list[str]:
    lines = ["| variant (B = 1) | host time per call | latency per call (synchronised) "
             "| device time per graph replay | note |",
             "|---|---|---|---|---|"]

    def us(v):
        return "-" if v is None else f"{v * 1e6:.1f} us"

    for r in rows:
        note = r["note"] or (f"{r['status']}: {r['reason']}" if r["status"] != "ok" else "")
        lines.append(f"| {r['backend']} ({r['config_str']}) | {us(r['host_s'])} | {us(r['median_s'])} | "
                     f"{us(r['graph_s'])} | {note} |")
    return lines

"""Figures (PNG) and the markdown report of a demo run. Everything here reads the `results` dict that
`gsa_kernels.demo.__main__.run` builds (also saved as results.json), so a report can be redrawn from it.
(Slightly above 400 lines on purpose: each figure sits next to the report section that cites it.)"""
from __future__ import annotations

import math
import os

import torch

METRIC_NAMES = {"fd_feature": "FD (classifier features)", "fd_pixel": "FD (pixels)"}
METHOD_NAMES = {"heun": "EDM Heun", "dpmpp_2m": "DPM-Solver++(2M)", "unipc": "UniPC", "euler": "Euler",
                "ddim": "DDIM"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_axes(ax, x=True, y=True):
    """Log axes with plain numbers at 1-2-5 ticks (matplotlib's default labels the minor ticks too densely)."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    for on, axis in ((x, ax.xaxis), (y, ax.yaxis)):
        if not on:
            continue
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        fmt = ScalarFormatter()
        fmt.set_scientific(False)
        axis.set_major_formatter(fmt)
        axis.set_minor_formatter(NullFormatter())


def image_grid(images: torch.Tensor, image_shape, ncol: int = 8) -> torch.Tensor:
    """[B, d] in [-1, 1] -> one [H*rows + pad, W*ncol + pad, C] array in [0, 1] for imshow."""
    c, h, w = image_shape
    b = images.shape[0]
    nrow = math.ceil(b / ncol)
    pad = 1
    canvas = torch.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 0.35)  # grey separators
    imgs = ((images.float().clamp(-1, 1) + 1) / 2).reshape(b, c, h, w).permute(0, 2, 3, 1)
    for i in range(b):
        r, q = divmod(i, ncol)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = imgs[i]
    return canvas


def _show(ax, grid: torch.Tensor, title: str):
    if grid.shape[2] == 1:
        ax.imshow(grid[:, :, 0].numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def plot_sample_grids(panels: list[tuple[str, torch.Tensor]], image_shape, path: str):
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
    for ax, (title, imgs) in zip(axes if len(panels) > 1 else [axes], panels):
        _show(ax, image_grid(imgs, image_shape), title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_quality_vs_nfe(summary: list[dict], metrics, fractions, path: str):
    """One panel per (metric, method): FD against network evaluations, one line per requested skip fraction
    f (the points are the configurations (N, k = round(f N)))."""
    from .evaluate import skip_of

    plt = _plt()
    methods = list(dict.fromkeys(e["method"] for e in summary))
    fracs = sorted(set(fractions) | {0.0})
    cmap = plt.get_cmap("viridis")
    index = {(e["method"], e["steps"], e["skip"]): e for e in summary}
    fig, axes = plt.subplots(len(metrics), len(methods), figsize=(4.0 * len(methods), 3.2 * len(metrics)),
                             squeeze=False)
    for i, m in enumerate(metrics):
        for j, method in enumerate(methods):
            ax = axes[i][j]
            steps = sorted({e["steps"] for e in summary if e["method"] == method})
            for fi, f in enumerate(fracs):
                pts = [index[(method, n, skip_of(f, n))] for n in steps if (method, n, skip_of(f, n)) in index]
                pts = sorted(pts, key=lambda e: e["nfe"])
                if not pts:
                    continue
                style = dict(color="k", lw=2, zorder=3) if f == 0 else dict(color=cmap(fi / max(1, len(fracs) - 1)))
                ax.errorbar([e["nfe"] for e in pts], [e[f"{m}_mean"] for e in pts], [e[f"{m}_std"] for e in pts],
                            marker="o", ms=3, capsize=2, label="no teleport" if f == 0 else f"skip {f:.0%}", **style)
            ax.set_xscale("log")
            ax.set_yscale("log")
            _log_axes(ax)
            ax.set_xlabel("network evaluations (NFE)")
            ax.set_ylabel(METRIC_NAMES.get(m, m))
            ax.set_title(METHOD_NAMES.get(method, method), fontsize=10)
            ax.grid(alpha=0.3, which="both")
            if i == 0 and j == len(methods) - 1:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_savings(savings: list[dict], path: str):
    """Fraction of network evaluations saved at equal quality, per method and step count."""
    plt = _plt()
    methods = list(dict.fromkeys(s["method"] for s in savings))
    fig, axes = plt.subplots(1, len(methods), figsize=(4.0 * len(methods), 3.0), squeeze=False)
    for ax, method in zip(axes[0], methods):
        rows = [s for s in savings if s["method"] == method]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [100 * s["saved_same_schedule"] for s in rows], 0.4,
               label="vs same schedule, no teleport")
        ax.bar([x + 0.2 for x in xs], [100 * s["saved_vs_cheapest_plain"] for s in rows], 0.4,
               label="vs fewest plain steps of equal quality")
        ax.axhline(20, color="k", ls="--", lw=0.8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"N={s['steps']}\n{s['baseline_nfe']} NFE" for s in rows], fontsize=7)
        ax.set_ylabel("NFE saved at equal quality (%)")
        values = [100 * s[key] for s in rows for key in ("saved_same_schedule", "saved_vs_cheapest_plain")]
        ax.set_ylim(min(0, *values) - 2, 1.35 * max(25, *values))  # headroom for the legend
        ax.set_title(METHOD_NAMES.get(method, method), fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_explained_variance(analysis: dict, path: str, skip_sigmas=None, floor: float = -1.0):
    """EV of the network by each model across sigma (solid), and of the training-set model by the Gaussian
    (dashed: what an ideal network would show). Values below `floor` are drawn at the floor."""
    plt = _plt()
    sig = analysis["sigmas"]
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.4))
    for ax, key, title in ((axes[0], "ev_score", "score"), (axes[1], "ev_denoiser", "denoiser (centred)")):
        for name, curve in analysis[key].items():
            ax.plot(sig, [max(v, floor) for v in curve], marker="o", ms=2.5, label=f"{name} vs network")
        for name, curve in analysis.get(key + "_analytic", {}).items():
            ax.plot(sig, [max(v, floor) for v in curve], ls="--", color="gray", label=name)
        ax.set_xscale("log")
        ax.set_ylim(floor - 0.05, 1.05)
        ax.set_xlabel("sigma")
        ax.set_ylabel("explained variance")
        ax.set_title(f"EV of the {title}" + (f" (clipped at {floor:g})" if key == "ev_score" else ""), fontsize=10)
        ax.grid(alpha=0.3, which="both")
        for s in skip_sigmas or []:
            ax.axvline(s, color="gray", lw=0.6, ls=":")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_linearity(lin: dict, path: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 3.3))
    ax.plot(lin["sigmas"], lin["r2"], marker="o", ms=2.5, label="R^2 of the best affine fit")
    ax.plot(lin["sigmas"], lin["cosine"], marker="o", ms=2.5, label="cosine(fit, Gaussian)")
    ax.plot(lin["sigmas"], lin["difference"], marker="o", ms=2.5, label="||fit - Gaussian|| / ||fit||")
    ax.set_xscale("log")
    ax.set_xlabel("sigma")
    ax.set_title("Linearity of the network denoiser", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_trajectories(traj: dict, path: str):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.3))
    for name, t in traj.items():
        axes[0].plot(t["sigmas"][1:-1], t["chord_deviation"][1:-1], marker="o", ms=2.5, label=name)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("sigma")
    axes[0].set_ylabel("distance from chord / chord length")
    axes[0].set_title("Sampling trajectory: deviation from its chord", fontsize=10)
    for name, t in traj.items():
        # The last denoised point is the sample itself (the final step lands on D): distance 0, off a log axis.
        for key, style, label in (("dist_x", dict(marker="o"), "x(sigma)"),
                                  ("dist_denoised", dict(marker="s", ls="--"), "D(x(sigma))")):
            pts = [(s, v) for s, v in zip(t["sigmas"][:-1], t[key]) if v > 0]
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], ms=2.5, label=f"{name}: {label}", **style)
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("sigma")
    axes[1].set_ylabel("distance to the final sample")
    axes[1].set_title("Sampling vs denoising trajectory", fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_training_loss(curve, path: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    ax.plot([c[0] for c in curve], [c[1] for c in curve])
    ax.set_xlabel("step")
    ax.set_ylabel("EDM loss (smoothed)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Markdown


def _pm(mean: float, std: float) -> str:
    digits = 3 if mean < 1 else 2
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def savings_table(savings: list[dict], metrics) -> str:
    rows = []
    for s in savings:
        n_any, k_any = s["cheapest_any"]
        paired = [f"{s['paired_diff'][m][0]:+.3f} ± {s['paired_diff'][m][1]:.3f}" if s["max_skip"] else "-"
                  for m in metrics]
        rows.append([
            METHOD_NAMES.get(s["method"], s["method"]), str(s["steps"]), str(s["baseline_nfe"]),
            f"{s['max_skip']} ({s['max_skip'] / s['steps']:.0%})", str(s["skip_nfe"]),
            f"**{s['saved_same_schedule']:.0%}**", *paired,
            f"N={s['cheapest_plain_steps']}: {s['cheapest_plain_nfe']}",
            f"N={n_any}, k={k_any}: {s['cheapest_any_nfe']}",
            f"{s['saved_vs_cheapest_plain']:.0%}",
        ])
    return _table(["sampler", "N", "NFE (no teleport)", "largest equal-quality skip k", "NFE with skip",
                   "saved (same schedule)"] + [f"paired Δ{METRIC_NAMES.get(m, m)} at k" for m in metrics]
                  + ["fewest plain steps of equal quality: NFE", "cheapest config of equal quality: NFE",
                     "saved vs fewest plain steps"], rows)


def quality_table(summary: list[dict], metrics) -> str:
    rows = []
    for e in summary:
        rows.append([METHOD_NAMES.get(e["method"], e["method"]), str(e["steps"]),
                     f"{e['skip']} ({e['skip_fraction']:.0%})", str(e["nfe"])]
                    + [_pm(e[f"{m}_mean"], e[f"{m}_std"]) for m in metrics])
    return _table(["sampler", "N", "skip k", "NFE"] + [METRIC_NAMES.get(m, m) for m in metrics], rows)


def headline(results: dict) -> list[str]:
    """The short summary: per sampler, the saving at the largest step count, in words."""
    lines = []
    by_method = {}
    for s in results["savings"]:
        by_method.setdefault(s["method"], []).append(s)
    for method, rows in by_method.items():
        best = max(rows, key=lambda s: s["steps"])
        same = [f"N={s['steps']}: {s['saved_same_schedule']:.0%}" for s in rows]
        lines.append(
            f"{METHOD_NAMES.get(method, method)}: at N={best['steps']} ({best['baseline_nfe']} NFE) teleport skips "
            f"{best['max_skip']} steps at equal quality -> {best['skip_nfe']} NFE, "
            f"{best['saved_same_schedule']:.0%} saved vs the same schedule "
            f"({best['saved_vs_cheapest_plain']:.0%} vs the fewest plain steps of equal quality). "
            f"Same-schedule saving per N: {', '.join(same)}.")
    return lines


def findings(results: dict) -> list[str]:
    """Plain statements read off the numbers of this run (nothing here is assumed from the papers)."""
    out = []
    by_method = {}
    for sv in results["savings"]:
        by_method.setdefault(sv["method"], []).append(sv)
    for method, rows in by_method.items():
        name = METHOD_NAMES.get(method, method)
        lo, hi = min(r["saved_same_schedule"] for r in rows), max(r["saved_same_schedule"] for r in rows)
        below = [r["steps"] for r in rows if r["saved_same_schedule"] < 0.2]
        claim = ("at least 20% at every N" if not below else
                 f"less than 20% at N = {', '.join(map(str, below))}")
        landed = [f"N={r['steps']}: k={r['max_skip']}, sigma {r['sigma_start']:.3g}" for r in rows if r["max_skip"]]
        failed = [f"N={r['steps']}: k={r['first_failing_skip']}, sigma {r['sigma_failing']:.3g}"
                  for r in rows if r["first_failing_skip"] is not None]
        out.append(f"{name}: teleport saved {lo:.0%} to {hi:.0%} of the network evaluations at equal quality "
                   f"against the same schedule ({claim}). Largest equal-quality skips and the sigma they land on: "
                   f"{'; '.join(landed) or 'none'}. First skips that lost equal quality: "
                   f"{'; '.join(failed) or 'none'}.")
    an = results["analysis"]
    sig = an["sigmas"]
    ev_g = an["ev_score"].get("Gaussian")
    top = _top_run(sig, ev_g, lambda v: v >= 0.99) if ev_g else None
    if top is not None:
        out.append(f"The Gaussian explains >= 99% of the network's score for every sigma >= {sig[top]:.3g}; below, "
                   + ", ".join(f"{ev_g[i]:.3f} at {sig[i]:.3g}" for i in range(top - 1, -1, -1)
                               if sig[i] >= 0.01 or i == 0) + ".")
    ev_d = an["ev_denoiser"].get("Gaussian")
    ideal = next(iter(an.get("ev_denoiser_analytic", {}).values()), None)
    if ev_d and ideal:
        out.append(f"Denoiser EV (centred) by the Gaussian at sigma = {sig[-1]:.3g}: {ev_d[-1]:.3f} for the network "
                   f"vs {ideal[-1]:.3f} for the training-set denoiser. A value far below the ideal one means the "
                   "network's own output at that noise level differs from the optimal denoiser (which is what "
                   "teleport replaces).")
    lin = an["linearity"]
    good = [f"[{lin['sigmas'][a]:.3g}, {lin['sigmas'][b]:.3g}]" for a, b in _runs(lin["cosine"], lambda c: c >= 0.95)]
    out.append(f"The best affine fit of the network's denoiser has cosine >= 0.95 with the Gaussian denoiser for "
               f"sigma in {' and '.join(good) or 'no sigma'} (R^2 of the fit {min(lin['r2']):.2f} to "
               f"{max(lin['r2']):.2f} over all sigma).")
    return out


def _runs(values, ok) -> list[tuple[int, int]]:
    """Index ranges [a, b] of consecutive values satisfying ok."""
    runs, start = [], None
    for i, v in enumerate(list(values) + [None]):
        if v is not None and ok(v):
            start = i if start is None else start
        elif start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


def _top_run(sigmas, values, ok):
    """Index of the smallest sigma from which every larger sigma satisfies ok (sigmas ascending), or None."""
    runs = _runs(values, ok)
    return runs[-1][0] if runs and runs[-1][1] == len(sigmas) - 1 else None


def write_report(results: dict, path: str, figure_prefix: str = "") -> None:
    """The markdown report; figures are referenced as figure_prefix + file name."""
    cfg, metrics = results["config"], results["metrics"]
    fig = {k: figure_prefix + v for k, v in results["figures"].items()}
    tr, data = results["training"], results["data"]
    sweep = cfg["sweep"]
    lines = [
        "# gsa_kernels demo: analytical teleportation on a model trained here",
        "",
        f"Generated by `{' '.join(['python -m gsa_kernels.demo'] + list(results['argv']))}`.",
        # No wall-clock times here: the report depends only on the settings, so two runs on any machine
        # give the same file. Timings are printed by the run and kept in results.json.
        f"Device: {results['device']}.",
        "",
        "## Setup",
        "",
        f"- Data: {data['name']}, {data['n_train']} training / {data['n_test']} held-out images of shape "
        f"{tuple(data['image_shape'])}, scaled to [-1, 1] (split seed {cfg['data_seed']}).",
        f"- Denoiser: EDM-preconditioned residual MLP ({tr['parameters']:,} parameters, hidden "
        f"{cfg['model']['hidden']}, {cfg['model']['blocks']} blocks, sigma_data {cfg['model']['sigma_data']:.3f}), "
        f"trained {tr['steps_done']} of {tr['steps_planned']} planned steps (batch {cfg['train']['batch_size']}, "
        f"EMA {cfg['train']['ema_decay']}); final smoothed loss {tr['final_loss']:.4f}"
        + (f" — **stopped early by the {cfg['train']['max_minutes']}-minute wall-clock cap**"
           if tr["stopped_early"] else "") + ".",
        f"- Gaussian: full rank, fitted to the training split. GMM: {cfg['gmm']['n_components']} components, "
        f"rank {cfg['gmm']['rank']}.",
        f"- Quality: Frechet distance to the held-out split in pixel space and in the {results['feature_dim']}-d "
        f"penultimate features of an MLP classifier trained on the training split (held-out accuracy "
        f"{results['classifier_accuracy']:.1%})" if results.get("classifier_accuracy") is not None else
        "- Quality: Frechet distance to the held-out split in pixel space (no labels: no classifier features)",
        f"- Sampling: EDM/Karras schedule (sigma {sweep['sigma_max']} -> {sweep['sigma_min']}, rho {sweep['rho']}), "
        f"samplers {', '.join(METHOD_NAMES.get(m, m) for m in sweep['methods'])}, N in {list(sweep['steps'])}, "
        f"skips k = round(f N) for f in {list(sweep['skip_fractions'])} (teleport sigma_0 -> sigma_k with the "
        f"Gaussian, then the sampler on sigma_k..0), {len(sweep['seeds'])} seeds x {sweep['n_samples']} samples. "
        "All configurations of a seed start from the same noise. Samples are measured as produced (no clipping).",
        "- Equal quality: a configuration's mean FD is at most the baseline's mean plus the larger of the two "
        "seed standard deviations, in every metric. NFE counts network evaluations (Heun: 2N - 1).",
        "",
        "Reference points (same metrics, mean ± std over the seeds where sampled):",
        "",
    ]
    ref_rows = [[name] + [_pm(v[f"{m}_mean"], v[f"{m}_std"]) for m in metrics]
                for name, v in results["references"].items()]
    lines += [_table(["reference"] + [METRIC_NAMES.get(m, m) for m in metrics], ref_rows), ""]
    lines += ["## Network evaluations saved at equal quality", ""]
    lines += [f"- {h}" for h in headline(results)]
    lines += ["", "Findings of this run:", ""] + [f"- {f}" for f in findings(results)]
    lines += ["", savings_table(results["savings"], metrics), "",
              "\"Same schedule\" is the papers' claim: skip the first k steps of an N-step schedule and keep its "
              "quality. \"Vs fewest plain steps\" is the stricter question: compared with simply running fewer "
              "steps without teleport (any N' in the sweep), what does the cheapest configuration of the same "
              "quality cost?", "",
              f"![NFE saved]({fig['savings']})", "", f"![FD vs NFE]({fig['quality']})", "",
              "## Samples", "", results["grid_caption"], "", f"![samples]({fig['samples']})", "",
              "## Analysis of the trained model (gsa_kernels.analysis)", "",
              "Explained variance of the network's score, EV = 1 - ||s_net - s_model||^2 / ||s_net||^2 per point, "
              "averaged over x = x_train + sigma eps (docs/math.md section 5); the right panel uses the denoiser "
              "centred at the data mean instead. Dotted lines: the sigmas the 10-50% skips of the "
              f"N={results['grid_steps']} schedule land on.", "",
              f"![explained variance]({fig['explained_variance']})", ""]
    an = results["analysis"]
    ev_rows = []
    for i, s in enumerate(an["sigmas"]):
        ev_rows.append([f"{s:.3g}"] + [f"{an['ev_score'][n][i]:.3f}" for n in an["ev_score"]]
                       + [f"{an['linearity'][k][i]:.3f}" for k in ("r2", "cosine", "difference")])
    lines += [_table(["sigma"] + [f"EV score: {n}" for n in an["ev_score"]]
                     + ["linear R^2", "cos(fit, Gaussian)", "rel. difference fit vs Gaussian"], ev_rows), ""]
    lines += ["Linearity: the best affine map from x = x_train + sigma eps to the network's denoiser output "
              "(least squares), its R^2, and its matrix compared with the Gaussian denoiser's "
              "U diag(lam / (lam + sigma^2)) U^T.", "", f"![linearity]({fig['linearity']})", "",
              "Trajectory geometry for the same noise: the network's EDM Heun trajectory and the Gaussian's exact "
              "PF-ODE trajectory. Left: distance of x(sigma) from the straight line between its start and its end. "
              "Right: distance to the final sample of x(sigma) and of the denoised estimate D(x(sigma); sigma).",
              "", f"![trajectories]({fig['trajectories']})", ""]
    tj = an["trajectory"]
    lines += ["Largest relative deviation from the chord: "
              + ", ".join(f"{n}: {max(t['chord_deviation']):.3f}" for n, t in tj.items()) + ".", ""]
    lines += ["## Training", "", f"![training loss]({fig['training_loss']})", "",
              "## All configurations", "", quality_table(results["summary"], metrics), ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))

"""The demo end to end: data -> trained denoiser (cached) -> Gaussian and GMM fits -> sampling sweep with
teleport -> equal-quality accounting -> analysis curves -> figures, markdown report, printed summary."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch

from .. import analysis, sampling
from ..gaussian.model import GaussianModel
from ..mixture import GMM, DeltaMixture
from . import report
from .data import load_dataset
from .evaluate import SweepConfig, mean_std, run_sweep, savings, schedule, seed_noise, skips_for, summarize
from .metrics import QualityMeter, accuracy, train_classifier
from .model import DenoiserConfig
from .train import TrainConfig, load_or_train

# Import name -> distribution of the demo's optional dependencies (the [demo] extra of pyproject.toml).
DEMO_DEPENDENCIES = {"tqdm": "tqdm", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "PIL": "pillow"}


def check_demo_dependencies() -> None:
    """Fail before any work starts (not at the report, minutes later) when a demo dependency is missing."""
    missing = [dist for module, dist in DEMO_DEPENDENCIES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"the demo needs {', '.join(missing)} (not installed): "
                          "pip install 'gsa_kernels[demo]'")


FIGURES = {
    "quality": "fd_vs_nfe.png",
    "savings": "nfe_saved.png",
    "samples": "samples_teleport.png",
    "explained_variance": "explained_variance.png",
    "linearity": "linearity.png",
    "trajectories": "trajectories.png",
    "training_loss": "training_loss.png",
}


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _float_list(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gsa_kernels.demo",
        description="Train a small diffusion model on scikit-learn's digits (or --data), then measure how many "
                    "network evaluations analytical teleportation saves at equal sample quality, and write a "
                    "report with figures.")
    p.add_argument("--data", default=None, help="a .pt/.npy/.npz tensor file or an image folder (default: digits)")
    p.add_argument("--out", default="outputs/demo", help="folder for the report, figures and results.json")
    p.add_argument("--cache-dir", default="outputs/demo/cache", help="where the trained denoiser is kept")
    p.add_argument("--retrain", action="store_true", help="train even if a matching checkpoint exists")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads during the run (default 1: the model is small, and on a shared machine "
                        "more threads than free cores stall on each other; 0 keeps torch's setting)")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--data-seed", type=int, default=0)
    g = p.add_argument_group("training")
    g.add_argument("--train-steps", type=int, default=TrainConfig.steps)
    g.add_argument("--train-minutes", type=float, default=TrainConfig.max_minutes,
                   help="optional wall-clock cap on training (off by default; when it stops training early, "
                        "the report says so)")
    g.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    g.add_argument("--lr", type=float, default=TrainConfig.lr)
    g.add_argument("--hidden", type=int, default=DenoiserConfig.hidden)
    g.add_argument("--blocks", type=int, default=DenoiserConfig.blocks)
    g.add_argument("--seed", type=int, default=0, help="training seed")
    g.add_argument("--classifier-steps", type=int, default=1500)
    s = p.add_argument_group("evaluation")
    s.add_argument("--methods", default=",".join(SweepConfig.methods), help=f"comma list of {sampling.METHODS}")
    s.add_argument("--steps", default=",".join(map(str, SweepConfig.steps)), help="comma list of step counts N")
    s.add_argument("--skips", default=",".join(map(str, SweepConfig.skip_fractions)),
                   help="comma list of skip fractions of N (0 = no teleport)")
    s.add_argument("--seeds", type=int, default=len(SweepConfig.seeds), help="number of sampling seeds")
    s.add_argument("--samples", type=int, default=SweepConfig.n_samples, help="samples per seed")
    s.add_argument("--gmm-components", type=int, default=10)
    s.add_argument("--gmm-rank", type=int, default=16)
    s.add_argument("--analysis-sigmas", type=int, default=17, help="noise levels of the analysis curves")
    s.add_argument("--grid-steps", type=int, default=18, help="step count of the sample grids and trajectories")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _metric_stats(values: list[dict], metrics) -> dict:
    out = {}
    for m in metrics:
        out[f"{m}_mean"], out[f"{m}_std"] = mean_std([x[m] for x in values])
    return out


def _to_jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    return obj


def run(argv=None) -> dict:
    """Run the demo with command-line arguments `argv` (None: sys.argv[1:]); returns the results dict."""
    args = build_parser().parse_args(argv)
    check_demo_dependencies()
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, argv: list) -> dict:
    t_start = time.perf_counter()
    device = torch.device(args.device)
    progress = not args.no_progress
    os.makedirs(args.out, exist_ok=True)
    log = print

    # ---- data, denoiser, classifier -----------------------------------------------------------------
    data = load_dataset(args.data, test_fraction=args.test_fraction, seed=args.data_seed)
    log(f"data: {data.name}: {data.train.shape[0]} train / {data.test.shape[0]} test images {data.image_shape}")
    model_cfg = DenoiserConfig(dim=data.dim, hidden=args.hidden, blocks=args.blocks,
                               sigma_data=round(float(data.train.std()), 4))
    train_cfg = TrainConfig(steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            max_minutes=args.train_minutes)
    model, train_info = load_or_train(data, model_cfg, train_cfg, os.path.join(args.cache_dir, "denoiser.pt"),
                                      retrain=args.retrain, progress=progress, log=log)
    model = model.to(device)
    t_trained = time.perf_counter()

    def network(x, sigma):
        return model(x, sigma)

    classifier, clf_acc = None, None
    if data.train_labels is not None and data.n_classes > 1:
        classifier = train_classifier(data.train, data.train_labels, steps=args.classifier_steps, seed=args.seed)
        clf_acc = accuracy(classifier, data.test, data.test_labels)
        log(f"feature classifier: held-out accuracy {clf_acc:.1%}")
    else:
        log("no labels: quality is measured in pixel space only")
    meter = QualityMeter(data.test, classifier)
    metrics = meter.metrics

    train_d = data.train.to(device)
    gaussian = GaussianModel.fit(train_d)
    gmm = GMM.fit(train_d, n_components=args.gmm_components, rank=min(args.gmm_rank, data.dim - 1), seed=args.seed,
              verbose=progress)
    delta = DeltaMixture(train_d)
    t_fit = time.perf_counter()

    sweep = SweepConfig(methods=tuple(args.methods.split(",")), steps=_int_list(args.steps),
                        skip_fractions=_float_list(args.skips), seeds=tuple(range(args.seeds)),
                        n_samples=args.samples)

    # ---- the sweep ------------------------------------------------------------------------------------
    rows = run_sweep(network, gaussian, meter, data.dim, sweep, progress=progress)
    summary = summarize(rows, metrics)
    saving_rows = [s.to_dict() for s in savings(summary, metrics,
                                                lambda n, k: float(schedule(sweep, n)[k]))]
    t_sweep = time.perf_counter()

    # ---- reference points -----------------------------------------------------------------------------
    grid_n = min(sweep.steps, key=lambda n: abs(n - args.grid_steps))
    grid_sigmas = schedule(sweep, grid_n)
    references = {"held-out vs training split (data itself)": _metric_stats([meter(data.train)], metrics)}
    with torch.inference_mode():
        per_seed = {"Gaussian alone (teleport to sigma=0, 0 NFE)": [], f"GMM, EDM Heun N={grid_n}": [],
                    f"training set (delta mixture), EDM Heun N={grid_n}": []}
        for seed in sweep.seeds:
            noise = seed_noise(seed, sweep.n_samples, data.dim).to(device)
            x_init = noise * float(grid_sigmas[0])
            names = list(per_seed)
            per_seed[names[0]].append(meter(gaussian.teleport(x_init, float(grid_sigmas[0]), 0.0)))
            per_seed[names[1]].append(meter(sampling.sample(gmm, noise, grid_sigmas, method="heun").x))
            per_seed[names[2]].append(meter(sampling.sample(delta, noise, grid_sigmas, method="heun").x))
    references.update({name: _metric_stats(v, metrics) for name, v in per_seed.items()})

    # ---- sample grids ---------------------------------------------------------------------------------
    grid_skips = skips_for(grid_n, sweep.skip_fractions)
    shown = [0] + [k for k in (grid_skips[len(grid_skips) // 2], grid_skips[-1]) if k > 0]
    shown = list(dict.fromkeys(shown))
    panels = []
    with torch.inference_mode():
        noise = seed_noise(0, sweep.n_samples, data.dim)[:64].to(device)
        for k in shown:
            res = sampling.sample(network, noise, grid_sigmas, method="heun", gaussian=gaussian, skip=k)
            title = "no teleport" if k == 0 else f"teleport, skip {k}/{grid_n}"
            panels.append((f"{title} ({res.n_evals} NFE)", res.x.cpu()))
        panels.append(("Gaussian alone (0 NFE)",
                       gaussian.teleport(noise * float(grid_sigmas[0]), float(grid_sigmas[0]), 0.0).cpu()))
        panels.append(("held-out data", data.test[:64]))
    grid_caption = (f"EDM Heun with N={grid_n} steps from the same 64 noise draws (seed 0), without and with "
                    "teleport; then samples of the fitted Gaussian alone, and held-out images.")

    t_refs = time.perf_counter()

    # ---- analysis curves ------------------------------------------------------------------------------
    an_sigmas = analysis.log_sigma_grid(args.analysis_sigmas, sweep.sigma_min, sweep.sigma_max)
    models = {"Gaussian": gaussian, f"GMM (K={args.gmm_components})": gmm, "training set": delta}
    ev_score = analysis.explained_variance_curves(network, models, train_d, an_sigmas, quantity="score")
    ev_den = analysis.explained_variance_curves(network, models, train_d, an_sigmas, quantity="denoiser")
    # What an ideal network would show: the training-set (empirical optimal) denoiser explained by the Gaussian.
    ideal = "Gaussian vs training set (no network)"
    ev_score_ideal = analysis.explained_variance(delta, gaussian, train_d, an_sigmas, quantity="score")
    ev_den_ideal = analysis.explained_variance(delta, gaussian, train_d, an_sigmas, quantity="denoiser")
    lin = analysis.linearity(network, gaussian, train_d, an_sigmas, n_samples=max(4 * data.dim, 2048))
    traj_noise = seed_noise(0, sweep.n_samples, data.dim)[:256].to(device)
    traj_net = analysis.record_trajectory(network, traj_noise, grid_sigmas, method="heun")
    traj_gauss = analysis.gaussian_trajectory(gaussian, traj_noise, grid_sigmas)
    trajectories = {}
    for name, t in (("network (EDM Heun)", traj_net), ("Gaussian (exact)", traj_gauss)):
        dist_x, dist_d = analysis.denoising_distances(t)
        trajectories[name] = {"sigmas": t.sigmas.tolist(), "chord_deviation": analysis.chord_deviation(t).tolist(),
                              "step_alignment": analysis.step_alignment(t).tolist(),
                              "dist_x": dist_x.tolist(), "dist_denoised": dist_d.tolist()}
    analysis_results = {
        "sigmas": an_sigmas,
        "ev_score": {k: v.tolist() for k, v in ev_score.items()},
        "ev_denoiser": {k: v.tolist() for k, v in ev_den.items()},
        "ev_score_analytic": {ideal: ev_score_ideal.tolist()},
        "ev_denoiser_analytic": {ideal: ev_den_ideal.tolist()},
        "linearity": {"sigmas": lin.sigmas, "r2": lin.r2.tolist(), "cosine": lin.cosine.tolist(),
                      "difference": lin.difference.tolist()},
        "trajectory": trajectories,
    }

    # ---- outputs --------------------------------------------------------------------------------------
    t_done = time.perf_counter()
    results = {
        "argv": argv,
        "device": (f"{device} ({torch.get_num_threads()} torch thread{'s' if torch.get_num_threads() > 1 else ''}, "
                   f"{os.cpu_count()} cores visible)" if device.type == "cpu" else str(device)),
        "threads": torch.get_num_threads(),
        "config": {"data_seed": args.data_seed, "model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
                   "sweep": sweep.to_dict(), "gmm": {"n_components": args.gmm_components,
                                                      "rank": min(args.gmm_rank, data.dim - 1)}},
        "data": {"name": data.name, "n_train": data.train.shape[0], "n_test": data.test.shape[0],
                 "image_shape": list(data.image_shape)},
        "training": {k: v for k, v in train_info.items()},
        "classifier_accuracy": clf_acc,
        "feature_dim": classifier.head.in_features if classifier is not None else 0,
        "metrics": list(metrics),
        "rows": rows,
        "summary": summary,
        "savings": saving_rows,
        "references": references,
        "grid_steps": grid_n,
        "grid_caption": grid_caption,
        "skip_sigmas": [float(grid_sigmas[k]) for k in grid_skips if k > 0],
        "analysis": analysis_results,
        "figures": dict(FIGURES),
        "timings": {"training_s": t_trained - t_start, "evaluation_s": t_done - t_trained,
                    "classifier_and_fits_s": t_fit - t_trained,
                    "sweep_s": t_sweep - t_fit, "references_and_grids_s": t_refs - t_sweep,
                    "analysis_s": t_done - t_refs},
    }
    fig_path = {k: os.path.join(args.out, v) for k, v in FIGURES.items()}
    report.plot_quality_vs_nfe(summary, metrics, sweep.skip_fractions, fig_path["quality"])
    report.plot_savings(saving_rows, fig_path["savings"])
    report.plot_sample_grids(panels, data.image_shape, fig_path["samples"])
    report.plot_explained_variance(analysis_results, fig_path["explained_variance"], results["skip_sigmas"])
    report.plot_linearity(analysis_results["linearity"], fig_path["linearity"])
    report.plot_trajectories(trajectories, fig_path["trajectories"])
    report.plot_training_loss(train_info["loss_curve"], fig_path["training_loss"])
    results["timings"]["total_s"] = time.perf_counter() - t_start
    report.write_report(results, os.path.join(args.out, "report.md"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(_to_jsonable(results), f, indent=1)

    # ---- summary --------------------------------------------------------------------------------------
    log("")
    log("== gsa_kernels demo: summary ==")
    tm = results["timings"]
    log(f"training {tm['training_s']:.0f} s{' (cached)' if train_info['cached'] else ''}, evaluation "
        f"{tm['evaluation_s']:.0f} s (sweep {tm['sweep_s']:.0f} s, references and grids "
        f"{tm['references_and_grids_s']:.0f} s, analysis {tm['analysis_s']:.0f} s), total {tm['total_s']:.0f} s "
        f"on {results['device']}")
    for e in summary:
        if e["skip"] == 0 and e["steps"] == max(sweep.steps):
            q = ", ".join(f"{m} {e[f'{m}_mean']:.3g}±{e[f'{m}_std']:.2g}" for m in metrics)
            log(f"{report.METHOD_NAMES.get(e['method'], e['method'])} N={e['steps']} ({e['nfe']} NFE): {q}")
    for line in report.headline(results):
        log(line)
    ev_g = ev_score["Gaussian"]
    shown_ev = range(0, len(an_sigmas), max(1, len(an_sigmas) // 6))
    log("EV of the network's score by the Gaussian: "
        + ", ".join(f"sigma {an_sigmas[i]:.3g}: {float(ev_g[i]):.3f}" for i in shown_ev))
    log(f"report: {os.path.join(args.out, 'report.md')}")
    return results


def main(argv=None) -> int:
    run(argv)
    return 0


__all__ = ["run", "main", "build_parser", "FIGURES"]

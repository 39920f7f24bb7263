"""The sampling sweep of the demo and its equal-quality accounting.

For every sampler, step count N and skip k (a fraction of N), sample with the network from the same noise
per seed (common random numbers: the configurations differ only in how they integrate), measure the
Frechet distances to the held-out split, and average over seeds. Then ask, per sampler: how many network
evaluations can teleportation save while the quality stays within the seed spread of the baseline?
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch

from .. import sampling
from .metrics import QualityMeter


@dataclass
class SweepConfig:
    methods: tuple[str, ...] = ("heun", "dpmpp_2m", "unipc")
    steps: tuple[int, ...] = (6, 9, 12, 18, 25)
    skip_fractions: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    seeds: tuple[int, ...] = (0, 1, 2)
    n_samples: int = 2000
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    batch_size: int = 4096  # samples per denoiser call; larger n_samples are split

    def __post_init__(self):
        bad = [m for m in self.methods if m not in sampling.METHODS]
        if bad:
            raise ValueError(f"methods must be among {sampling.METHODS}, got {bad}")
        if not self.steps or any(int(n) < 1 for n in self.steps):
            raise ValueError(f"steps must be integers >= 1, got {self.steps}")
        if any(not 0.0 <= f < 1.0 for f in self.skip_fractions):
            raise ValueError(f"skip_fractions must lie in [0, 1), got {self.skip_fractions}")
        if len(self.seeds) < 1:
            raise ValueError("seeds must not be empty")
        if self.n_samples < 2:
            raise ValueError(f"n_samples must be >= 2, got {self.n_samples}")

    def to_dict(self) -> dict:
        return asdict(self)


def skip_of(fraction: float, n_steps: int) -> int:
    """k = round(f * N), halves rounding up."""
    return int(math.floor(fraction * n_steps + 0.5))


def skips_for(n_steps: int, fractions) -> list[int]:
    """The distinct skips k = round(f * N) for the fractions, always including 0."""
    return sorted({0} | {skip_of(f, n_steps) for f in fractions})


def schedule(cfg: SweepConfig, n_steps: int) -> torch.Tensor:
    return sampling.karras_sigmas(n_steps, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho)


def seed_noise(seed: int, n: int, dim: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(10_000 + seed))


def batched_sample(denoiser, noise, sigmas, method, gaussian, skip, batch_size):
    """sampling.sample over chunks of the noise; returns (x, n_evals per sample path)."""
    xs, n_evals = [], 0
    for chunk in noise.split(batch_size):
        res = sampling.sample(denoiser, chunk, sigmas, method=method, gaussian=gaussian, skip=skip)
        xs.append(res.x)
        n_evals = res.n_evals
    return torch.cat(xs), n_evals


@torch.inference_mode()
def run_sweep(denoiser, gaussian, meter: QualityMeter, dim: int, cfg: SweepConfig, *,
              progress: bool = True) -> list[dict]:
    """One row per (method, N, k, seed): nfe, the Frechet distances, seconds."""
    from tqdm.auto import tqdm

    plan = [(m, n, k) for m in cfg.methods for n in cfg.steps for k in skips_for(n, cfg.skip_fractions)]
    rows = []
    bar = tqdm(total=len(plan) * len(cfg.seeds), desc="sampling sweep", disable=not progress, mininterval=1.0)
    device = getattr(gaussian, "mean", torch.empty(0)).device  # sample where the models live
    for seed in cfg.seeds:
        noise = seed_noise(seed, cfg.n_samples, dim).to(device)
        for method, n, k in plan:
            start = time.perf_counter()
            x, nfe = batched_sample(denoiser, noise, schedule(cfg, n), method, gaussian, k, cfg.batch_size)
            seconds = time.perf_counter() - start
            rows.append({"method": method, "steps": n, "skip": k, "skip_fraction": k / n, "nfe": nfe,
                         "seed": seed, "seconds": seconds, **meter(x)})
            bar.update()
    bar.close()
    return rows


def mean_std(values) -> tuple[float, float]:
    """Mean and standard deviation (ddof = 1; 0 for one value) of a list of numbers."""
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), (float(v.std()) if len(values) > 1 else 0.0)


def summarize(rows: list[dict], metrics) -> list[dict]:
    """Mean and standard deviation (over seeds, ddof = 1) per (method, N, k), and the paired difference
    to the same schedule without teleport (same seeds, same noise): {metric}_paired_diff_mean/_std."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["steps"], r["skip"])].append(r)
    out = []
    for (method, n, k), rs in groups.items():
        entry = {"method": method, "steps": n, "skip": k, "skip_fraction": k / n, "nfe": rs[0]["nfe"],
                 "seeds": len(rs), "seconds": sum(r["seconds"] for r in rs) / len(rs)}
        base = {r["seed"]: r for r in groups.get((method, n, 0), [])}
        for m in metrics:
            entry[f"{m}_mean"], entry[f"{m}_std"] = mean_std([r[m] for r in rs])
            diffs = [r[m] - base[r["seed"]][m] for r in rs if r["seed"] in base]
            if diffs:
                entry[f"{m}_paired_diff_mean"], entry[f"{m}_paired_diff_std"] = mean_std(diffs)
        out.append(entry)
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    out.sort(key=lambda e: (order[e["method"]], e["steps"], e["skip"]))
    return out


def equal_quality(candidate: dict, baseline: dict, metrics) -> bool:
    """Candidate quality is no worse than the baseline's, within the seed spread, in every metric:
    mean_c <= mean_b + max(std_b, std_c) (lower FD is better)."""
    return all(candidate[f"{m}_mean"] <= baseline[f"{m}_mean"] + max(baseline[f"{m}_std"], candidate[f"{m}_std"])
               for m in metrics)


@dataclass
class Saving:
    method: str
    steps: int
    baseline_nfe: int
    # Same schedule: the largest skip k such that every skip up to k keeps equal quality.
    max_skip: int = 0
    skip_nfe: int = 0
    # Against every configuration: the cheapest plain schedule (any N', k = 0) and the cheapest
    # configuration overall (any N', k) that reach this baseline's quality.
    cheapest_plain_steps: int = 0
    cheapest_plain_nfe: int = 0
    cheapest_any: tuple[int, int] = (0, 0)  # (N', k)
    cheapest_any_nfe: int = 0
    quality: dict = field(default_factory=dict)  # metric -> (mean, std) of the baseline
    paired_diff: dict = field(default_factory=dict)  # metric -> (mean, std) of FD(k = max_skip) - FD(k = 0)
    sigma_start: float = math.nan  # sigma_k the teleport lands on at k = max_skip
    first_failing_skip: int | None = None  # the smallest tried skip that lost equal quality (None: none did)
    sigma_failing: float = math.nan  # its sigma_k

    @property
    def saved_same_schedule(self) -> float:
        return 1.0 - self.skip_nfe / self.baseline_nfe

    @property
    def saved_vs_cheapest_plain(self) -> float:
        return 1.0 - self.cheapest_any_nfe / self.cheapest_plain_nfe

    def to_dict(self) -> dict:
        return {**asdict(self), "saved_same_schedule": self.saved_same_schedule,
                "saved_vs_cheapest_plain": self.saved_vs_cheapest_plain}


def savings(summary: list[dict], metrics, sigma_of=None) -> list[Saving]:
    """Network evaluations saved at equal quality, per method and baseline step count.
    sigma_of(N, k) -> sigma_k of the N-step schedule, to record where the teleport lands."""
    sigma_of = sigma_of or (lambda n, k: math.nan)
    out = []
    for method in dict.fromkeys(e["method"] for e in summary):
        entries = [e for e in summary if e["method"] == method]
        plain = sorted((e for e in entries if e["skip"] == 0), key=lambda e: e["nfe"])
        for base in plain:
            n = base["steps"]
            s = Saving(method, n, base["nfe"], skip_nfe=base["nfe"],
                       quality={m: (base[f"{m}_mean"], base[f"{m}_std"]) for m in metrics},
                       sigma_start=sigma_of(n, 0))
            for e in sorted((e for e in entries if e["steps"] == n and e["skip"] > 0), key=lambda e: e["skip"]):
                if not equal_quality(e, base, metrics):
                    s.first_failing_skip, s.sigma_failing = e["skip"], sigma_of(n, e["skip"])
                    break
                s.sigma_start = sigma_of(n, e["skip"])
                s.max_skip, s.skip_nfe = e["skip"], e["nfe"]
                s.paired_diff = {m: (e.get(f"{m}_paired_diff_mean", math.nan),
                                     e.get(f"{m}_paired_diff_std", math.nan)) for m in metrics}
            cheapest_plain = min((e for e in plain if equal_quality(e, base, metrics)), key=lambda e: e["nfe"])
            cheapest_any = min((e for e in entries if equal_quality(e, base, metrics)),
                               key=lambda e: (e["nfe"], e["skip"]))
            s.cheapest_plain_steps, s.cheapest_plain_nfe = cheapest_plain["steps"], cheapest_plain["nfe"]
            s.cheapest_any, s.cheapest_any_nfe = (cheapest_any["steps"], cheapest_any["skip"]), cheapest_any["nfe"]
            out.append(s)
    return out

"""Training the demo's denoiser with the EDM loss, and a checkpoint cache that later runs reuse."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from .data import Dataset
from .model import DenoiserConfig, EDMDenoiser


@dataclass
class TrainConfig:
    steps: int = 12000
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 300
    ema_decay: float = 0.999
    # EDM's log-normal training distribution of sigma: ln(sigma) ~ N(p_mean, p_std^2).
    p_mean: float = -1.2
    p_std: float = 1.2
    seed: int = 0
    # Optional wall-clock cap (None: off). Off by default so that the trained model, and so the report,
    # depend only on the settings, never on how busy the machine is; when a cap stops training, the
    # report says so.
    max_minutes: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def edm_loss(model: EDMDenoiser, x0: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """E_sigma E_eps lambda(sigma) ||D(x0 + sigma eps; sigma) - x0||^2 with EDM's weight
    lambda = (sigma^2 + sd^2) / (sigma sd)^2, which makes every sigma's loss start at unit scale."""
    b = x0.shape[0]
    log_sigma = cfg.p_mean + cfg.p_std * torch.randn(b, generator=generator, dtype=x0.dtype)
    sigma = log_sigma.exp()
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    denoised = model(x0 + sigma[:, None] * noise, sigma)
    sd = model.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    return (weight[:, None] * (denoised - x0) ** 2).mean()


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_denoiser(data: Dataset, model_cfg: DenoiserConfig, cfg: TrainConfig, *, progress: bool = True):
    """Train an EDMDenoiser on data.train; returns (EMA model in eval mode, info dict)."""
    from tqdm.auto import tqdm

    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = EDMDenoiser(model_cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train = data.train
    n = train.shape[0]
    losses, smoothed = [], None
    start = time.perf_counter()
    deadline = None if cfg.max_minutes is None else start + 60.0 * cfg.max_minutes
    stopped_early = False
    bar = tqdm(range(cfg.steps), desc="training denoiser", disable=not progress, mininterval=1.0)
    step = 0
    for step in bar:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=generator)
        loss = edm_loss(model, train[idx], cfg, generator)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            # Ramp the EMA decay up early so the average does not remember the random initialization.
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        value = float(loss.detach())
        smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
        if step % 100 == 0 or step == cfg.steps - 1:
            losses.append((step, smoothed))
            bar.set_postfix(loss=f"{smoothed:.4f}")
        if deadline is not None and time.perf_counter() > deadline:
            stopped_early = True
            break
    bar.close()
    seconds = time.perf_counter() - start
    info = {
        "steps_done": step + 1,
        "steps_planned": cfg.steps,
        "stopped_early": stopped_early,
        "seconds": seconds,
        "final_loss": smoothed,
        "loss_curve": losses,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return ema.eval(), info


def _cache_key(data: Dataset, model_cfg: DenoiserConfig, cfg: TrainConfig) -> str:
    blob = json.dumps({"data": data.fingerprint(), "model": model_cfg.to_dict(), "train": cfg.to_dict()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_train(data: Dataset, model_cfg: DenoiserConfig, cfg: TrainConfig, checkpoint: str, *,
                  retrain: bool = False, progress: bool = True, log=print):
    """The trained model for (data, configs): loaded from `checkpoint` if it was saved for the same data
    and configs, else trained and saved there. Returns (model, info); info["cached"] says which."""
    key = _cache_key(data, model_cfg, cfg)
    if not retrain and os.path.exists(checkpoint):
        # weights_only: the checkpoint holds tensors and plain data only, and a file dropped into the
        # cache folder must not be able to run code when the demo starts.
        try:
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as err:  # not a checkpoint of ours (or unsafe): train anew, never execute it
            log(f"{checkpoint} is not a loadable checkpoint ({type(err).__name__}); training anew")
            saved = {}
        if saved and saved.get("key") == key:
            model = EDMDenoiser(DenoiserConfig(**saved["model_config"]))
            model.load_state_dict(saved["state_dict"])
            log(f"reusing the trained denoiser in {checkpoint} (trained {saved['info']['steps_done']} steps)")
            return model.eval().requires_grad_(False), {**saved["info"], "cached": True}
        elif saved:
            log(f"{checkpoint} was trained for other data or settings; training anew")
    model, info = train_denoiser(data, model_cfg, cfg, progress=progress)
    os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)
    torch.save({"key": key, "model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(),
                "state_dict": model.state_dict(), "info": info}, checkpoint)
    log(f"trained {info['steps_done']} steps in {info['seconds']:.0f} s; checkpoint saved to {checkpoint}")
    return model, {**info, "cached": False}

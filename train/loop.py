"""The training loop: distributed setup, loss, optimizer, EMA, logging, samples, checkpoints, exports."""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mumu_core.conditioning import SDXLConditioning
from mumu_core.presets import get_preset

from .checkpoint import (
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import TrainConfig
from .data import (
    BadItem,
    Batch,
    DataCounts,
    DataError,
    Prefetcher,
    Rules,
    ShardStream,
    batches,
    expand_shards,
    too_much_bad_data,
)
from .export import export
from .model import Built, build_model, param_groups, shard_model, trainable_named


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm was NaN/inf; the run stopped without updating or saving."""


class TrainInputError(ValueError):
    """An input or output of the run is unusable (found before the models load); says what to fix."""


class TooMuchBadData(DataError):
    """More bad samples / shards than ``data.max_bad_samples`` and ``data.max_bad_fraction`` allow."""


# ---------------------------------------------------------------------------------------------------
# Checks before the expensive work


def check_inputs(cfg: TrainConfig) -> list[str]:
    """Shard list, model folders, init bundle and out_dir, checked in seconds (no model loads).

    Returns the shard urls; raises the core's own errors (EncoderLoadError, SDXLLoadError,
    BundleError), DataError or TrainInputError, each a one-line message naming the path.
    """
    from mumu_core.encoder import check_vlm_folder
    from mumu_core.sdxl import SDXLLoadError

    urls = expand_shards(cfg.data.shards)
    for u in urls:
        if "://" in u or u.startswith("pipe:"):
            continue
        p = Path(u)
        if p.is_dir():
            raise DataError(
                f"data.shards entry {u} is a folder: list the .tar files in it, e.g. data.shards={u}/*.tar"
            )
        if not os.access(p, os.R_OK):
            raise DataError(f"shard {u} is not readable (permissions): fix its permissions or drop it")
    check_vlm_folder(cfg.model.vlm)
    if not Path(cfg.model.sdxl).exists():
        raise SDXLLoadError(
            f"model.sdxl {cfg.model.sdxl} does not exist: give the SDXL single .safetensors file or a "
            "diffusers folder (unet/ vae/ scheduler/)"
        )
    if cfg.model.init_bundle:
        check_bundle_header(Path(cfg.model.init_bundle))
    check_writable_dir(Path(cfg.out_dir), "out_dir")
    return urls


def check_bundle_header(path: Path) -> None:
    """The bundle exists and its metadata is a MUMU bundle's (tensors are read later, once)."""
    from safetensors import SafetensorError, safe_open

    from mumu_core.bundle import BUNDLE_HELP, BundleError, BundleMeta

    if not path.is_file():
        raise BundleError(f"model.init_bundle {path} does not exist. Put {BUNDLE_HELP} there.")
    try:
        with safe_open(str(path), framework="pt") as f:
            BundleMeta.from_metadata(f.metadata() or {}, path)
    except (SafetensorError, OSError) as e:
        raise BundleError(f"model.init_bundle {path} cannot be read as safetensors ({e})") from e


def check_writable_dir(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and prove a file can be written there (each process for itself)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise TrainInputError(
            f"{what} {folder} is not a writable folder ({e.strerror or e}): choose another {what} "
            "or fix its permissions"
        ) from None


def agree(ok: bool, device: torch.device) -> bool:
    """True when every process passed its checks (a collective: every process calls it)."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


# ---------------------------------------------------------------------------------------------------
# Distributed setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def distributed() -> Iterator[tuple[torch.device, int, int]]:
    """torchrun's environment when present; otherwise a 1-process group, so one code path runs."""
    saved = dict(os.environ)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    owns = not dist.is_initialized()
    if owns:
        # device_id binds NCCL to this rank's GPU up front (barriers then need no guessing).
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        yield device, dist.get_rank(), dist.get_world_size()
    finally:
        if owns:
            dist.destroy_process_group()
        if os.environ != saved:  # a single-process run leaves the caller's environment as it was
            os.environ.clear()
            os.environ.update(saved)


# ---------------------------------------------------------------------------------------------------
# Pieces


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of every part's lr at optimizer step ``step`` (0-based): warmup then the schedule."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    span = max(1, o.max_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1.0 - progress
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape


def check_finite(loss: float, grad_norm: float, step: int) -> None:
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteLoss(
            f"step {step + 1}: loss={loss} grad_norm={grad_norm} is not finite; the run stops before "
            "updating, and the last checkpoint stays intact. Lower the learning rates, check the data, "
            "or use fp32 (model.param_dtype=fp32) to find the cause"
        )


def encode_latents(vae, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    dist_ = vae.encode(pixels).latent_dist
    if hasattr(dist_, "mean") and hasattr(dist_, "std"):  # AutoencoderKL: sample with our generator
        eps = torch.randn(dist_.mean.shape, generator=gen).to(dist_.mean)
        latents = dist_.mean + dist_.std * eps
    else:  # the pixel-space stand-in has nothing to sample
        latents = dist_.sample()
    return latents.float() * vae.config.scaling_factor


def training_loss(
    built: Built,
    batch: Batch,
    device: torch.device,
    gen: torch.Generator,
    cfg: TrainConfig,
    prediction_type: str,
) -> torch.Tensor:
    vae, sched = built.vae, built.scheduler
    vae_dtype = next(iter(vae.state_dict().values())).dtype
    with torch.no_grad():
        latents = encode_latents(vae, batch.targets.to(device, vae_dtype), gen)
    b = latents.shape[0]
    # All randomness from one CPU generator whose state is checkpointed: a resumed run draws the same.
    noise = torch.randn(latents.shape, generator=gen).to(device)
    d = cfg.diffusion
    n_steps = sched.config.num_train_timesteps
    # The loss weight of every timestep of the schedule (None: plain MSE).
    step_weights = None
    if d.snr_gamma:
        step_weights = min_snr_weights(
            sched, torch.arange(n_steps), d.snr_gamma, prediction_type, d.snr_high_noise_floor
        )
    if step_weights is not None and d.timestep_sampling == "weighted":
        t = weighted_timesteps(step_weights, b, gen).to(device)
    else:
        t = torch.randint(0, n_steps, (b,), generator=gen).to(device)
    drop = (torch.rand(b, generator=gen) < d.cond_dropout).to(device)
    noisy = sched.add_noise(latents, noise, t)
    target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    pred = built.model(
        "loss", prompts=batch.prompts, noisy=noisy, timesteps=t, time_ids=batch.time_ids.to(device), drop=drop
    )
    if step_weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    if d.timestep_sampling == "weighted":
        # Drawn in proportion to the weights: the mean weight makes the expected loss (and so the
        # gradient's scale, which grad_clip sees) that of uniform timesteps times their weights.
        return per_sample.mean() * step_weights.mean().to(device)
    return (per_sample * step_weights.to(device)[t]).mean()


def min_snr_weights(
    sched, t: torch.Tensor, gamma: float, prediction_type: str, high_noise_floor: float = 0.0
) -> torch.Tensor:
    """Min-SNR-gamma weights of timesteps ``t``: min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v; a
    zero-terminal-SNR schedule gives weight 0 at SNR 0). ``high_noise_floor`` f lifts v's weight at high
    noise: max(min-SNR, f * min(1, gamma / (SNR + 1))), the low-noise cap unchanged (f = 1: weight 1 at
    every SNR up to gamma - 1; epsilon's weight already is 1 there)."""
    alphas = sched.alphas_cumprod.to(t.device)[t].double()
    snr = alphas / (1 - alphas).clamp_min(1e-20)
    if prediction_type == "v_prediction":
        w = snr.clamp(max=gamma) / (snr + 1)
        if high_noise_floor:
            w = torch.maximum(w, high_noise_floor * (gamma / (snr + 1)).clamp(max=1))
    else:
        w = snr.clamp(max=gamma) / snr.clamp_min(1e-8)
    return w.float()


def weighted_timesteps(step_weights: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` timesteps drawn with probability proportional to ``step_weights`` (one per timestep),
    stratified: one from each of ``count`` equal slices of the weights' cumulative mass, so a batch
    covers the weighted range evenly instead of by chance."""
    cdf = step_weights.double().cumsum(0)
    cdf = cdf / cdf[-1]
    u = (
        torch.arange(count, dtype=torch.float64) + torch.rand(count, generator=gen, dtype=torch.float64)
    ) / count
    return torch.searchsorted(cdf, u.clamp(max=1.0)).clamp(max=len(step_weights) - 1)


@torch.no_grad()
def sample_images(
    built: Built,
    prompts: list,
    device: torch.device,
    steps: int,
    guidance: float,
    resolution: int,
    prediction_type: str,
    seed: int,
) -> torch.Tensor:
    """DDIM samples with CFG against the negative convention, through the sharded model. (B,3,R,R) in [0,1]."""
    from diffusers import DDIMScheduler

    model, vae = built.model, built.vae
    sched = DDIMScheduler.from_config({**built.scheduler.config, "prediction_type": prediction_type})
    sched.set_timesteps(steps)
    b = len(prompts)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = model.unet.config.in_channels
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, channels, resolution // scale, resolution // scale, generator=gen).to(device)
    latents = latents * sched.init_noise_sigma
    was_training = model.training
    model.eval()
    try:
        cond = model("encode", prompts=prompts)
        neg = cond.negative(model.negative_pooled)
        both = SDXLConditioning(
            torch.cat([neg.context, cond.context]),
            torch.cat([neg.pooled, cond.pooled]),
            torch.cat([neg.attention_mask, cond.attention_mask]),
        )
        time_ids = torch.tensor(
            [[resolution, resolution, 0, 0, resolution, resolution]] * (2 * b), device=device
        )
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents, latents]), t)
            tt = t.to(device).expand(2 * b)
            out = model("denoise", latents=inp, timesteps=tt, cond=both, time_ids=time_ids).float()
            u, c = out.chunk(2)
            latents = sched.step(u + guidance * (c - u), t, latents).prev_sample
    finally:
        model.train(was_training)
    vae_dtype = next(iter(vae.state_dict().values())).dtype
    images = vae.decode((latents / vae.config.scaling_factor).to(vae_dtype)).sample.float()
    return ((images + 1) / 2).clamp(0, 1).cpu()


def save_grid(path: Path, examples: list, images: torch.Tensor, resolution: int) -> None:
    """One row per prompt: its reference images, the sample, the training target."""
    from PIL import Image

    from mumu_core.prompt import prepare_image

    def to_pil(x: torch.Tensor) -> Image.Image:
        return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))

    cols = max(len(ex.prompt.images) for ex in examples) + 2
    grid = Image.new("RGB", (cols * resolution, len(examples) * resolution), (32, 32, 32))
    for r, (ex, img) in enumerate(zip(examples, images)):
        for c, ref in enumerate(ex.prompt.images):
            tile = prepare_image(ref.image, ref.tokens).resize((resolution, resolution))
            grid.paste(tile, (c * resolution, r * resolution))
        grid.paste(to_pil(img), ((cols - 2) * resolution, r * resolution))
        grid.paste(to_pil((ex.target + 1) / 2), ((cols - 1) * resolution, r * resolution))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    path.with_suffix(".txt").write_text("\n".join(ex.prompt.to_text() for ex in examples) + "\n")


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class StopFlag:
    """SIGINT / SIGTERM ask for a clean stop: finish the step, save a checkpoint, exit.

    torchrun forwards Ctrl-C to its workers as SIGTERM, so both signals are handled; a second signal
    falls back to the default behaviour (immediate exit).
    """

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------
# The run


def run(cfg: TrainConfig, inspect: Callable[[Built], None] | None = None) -> dict[str, Any]:
    """Train according to ``cfg``. Returns a summary (rank 0's view).

    ``inspect`` is called on every rank with the trained (still sharded) model before the process
    group closes: tests and notebooks use it to look at the weights the run produced.
    """
    cfg.validate()
    with distributed() as (device, rank, world):
        return _run(cfg, device, rank, world, inspect)


def _run(
    cfg: TrainConfig, device: torch.device, rank: int, world: int, inspect: Callable[[Built], None] | None
) -> dict[str, Any]:
    from tqdm import tqdm

    def log(msg: str) -> None:
        if rank == 0:
            tqdm.write(msg)

    preset = get_preset(cfg.model.preset)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    prediction_type = (
        preset.scheduler.get("prediction_type", "epsilon")
        if cfg.diffusion.prediction_type == "preset"
        else cfg.diffusion.prediction_type
    )
    # Every process checks the inputs, outputs and the checkpoint to resume before any model loads;
    # all fail together (each with the message), so none is left waiting in a collective.
    failure: BaseException | None = None
    latest = None
    try:
        rules = Rules.from_config(cfg.data, preset.tokens_per_image, preset.resolution)
        urls = check_inputs(cfg)
        latest = latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
        if latest is not None:
            check_resumable(latest, cfg.to_dict(), world)
    except Exception as e:
        failure = e
    if not agree(failure is None, device):
        if failure is not None:
            raise failure
        raise TrainInputError("another process found a problem before training started: see its error line")

    built = build_model(cfg, preset, device, log)
    if prediction_type != built.scheduler.config.prediction_type:
        from diffusers import DDIMScheduler

        built.scheduler = DDIMScheduler.from_config(
            {**built.scheduler.config, "prediction_type": prediction_type}
        )
    shard_model(built.model, cfg, device)
    model = built.model
    named = trainable_named(model)
    n_train = sum(p.numel() for _, p in named)
    log(f"trainable parameters: {n_train:,} in {len(named)} tensors; processes: {world}; device: {device}")
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg),
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    ema = {n: p.detach().clone() for n, p in named} if cfg.diffusion.ema else {}
    built.ema = ema
    gen = torch.Generator().manual_seed(cfg.optim.seed * 1_000_003 + rank)

    step, position = 0, (0, 0)
    counts = DataCounts()
    if latest is not None:
        trainer, rank_state = load_checkpoint(latest, model, optimizer, ema)
        step = trainer["step"]
        position = tuple(rank_state["data_position"])
        counts = DataCounts(*rank_state.get("data_counts", (0, 0)))
        set_rng_state(rank_state["rng"], gen)
        # The optimizer state holds moments only; every group keeps the lr the config gives it
        # (param_groups), and the schedule below is a function of the step and this config.
        log(f"resumed from {latest} at step {step}")
    if step >= cfg.optim.max_steps:
        log(f"already at step {step} >= optim.max_steps={cfg.optim.max_steps}: nothing to do")
        return {"step": step, "stopped": "done"}

    def report_bad(item: BadItem) -> None:
        # Every process reports what it skipped itself (its shards are not the others').
        sys.stderr.write(f"warning: rank {rank}: {item.describe()}\n")  # one write: ranks share stderr
        sys.stderr.flush()

    stream = Prefetcher(
        iter(
            ShardStream(urls, rules, cfg.optim.seed, rank, world, position, counts=counts, on_bad=report_bad)
        ),
        cfg.data.prefetch,
    )
    batch_iter = batches(stream, cfg.optim.batch_size)
    fixed = []
    if cfg.logging.sample_every:
        fixed = list(
            islice(
                iter(ShardStream(urls, rules.deterministic(), cfg.optim.seed, rank, world)),
                cfg.logging.sample_count,
            )
        )

    writer = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"))
    losses_file = out / "losses.jsonl"
    last_position = position
    last_counts = tuple(counts.as_list())
    last_saved = step if latest is not None else None
    stopped = "done"

    def save() -> None:
        nonlocal last_saved
        trainer_state = {
            "step": step,
            "world_size": world,
            "lr_factor_next": lr_factor(step, cfg),
            "prediction_type": prediction_type,
            "config": cfg.to_dict(),
        }
        rank_state = {
            "data_position": list(last_position),
            "data_counts": list(last_counts),
            "rng": rng_state(gen),
        }
        path = save_checkpoint(
            ckpt_root, step, model, optimizer, ema, trainer_state, rank_state, cfg.checkpoint.keep
        )
        export(built, out / "export" / f"step_{step:08d}", ema, cfg, rules.tokens, prediction_type)
        if rank == 0:
            exports = sorted((out / "export").glob("step_*"))
            for old in exports[: -cfg.checkpoint.keep]:
                import shutil

                shutil.rmtree(old, ignore_errors=True)
        last_saved = step
        log(f"saved {path} and its export")

    bar = tqdm(
        total=cfg.optim.max_steps, initial=step, disable=rank != 0 or not cfg.logging.progress, desc="train"
    )
    accum = cfg.optim.grad_accum
    trainable = [p for _, p in named]
    try:
        with StopFlag() as stop:
            while step < cfg.optim.max_steps:
                t0 = time.perf_counter()
                factor = lr_factor(step, cfg)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                loss_sum = torch.zeros((), dtype=torch.float64)
                for micro in range(accum):
                    try:
                        batch = next(batch_iter)
                    except StopIteration:
                        raise RuntimeError("the data stream ended unexpectedly") from None
                    if world > 1 and not any(p.images for p in batch.prompts):
                        raise RuntimeError(
                            "a batch of this process has no image (data.image_drop_prob): under FSDP"
                            " every process must run the vision tower; lower image_drop_prob or"
                            " raise optim.batch_size"
                        )
                    # Reduce-scatter the gradients only on the last micro-step of the accumulation.
                    model.set_requires_gradient_sync(micro == accum - 1)
                    loss = training_loss(built, batch, device, gen, cfg, prediction_type)
                    (loss / accum).backward()
                    loss_sum += loss.detach().double().cpu()
                    last_position = batch.position
                    last_counts = batch.counts
                max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                # On the run's device: NCCL reduces CUDA tensors only.
                stats = torch.tensor(
                    [loss_sum.item() / accum, float(stop.requested), *last_counts],
                    dtype=torch.float64,
                    device=device,
                )
                dist.all_reduce(stats)
                mean_loss = stats[0].item() / world
                data_read, data_bad = int(stats[2].item()), int(stats[3].item())
                # Every process sees the same sums, so all stop together, before the update.
                if too_much_bad_data(
                    data_read, data_bad, cfg.data.max_bad_samples, cfg.data.max_bad_fraction
                ):
                    raise TooMuchBadData(
                        f"step {step + 1}: {data_bad} of {data_read} samples/shards read were bad, above "
                        f"data.max_bad_samples={cfg.data.max_bad_samples} and data.max_bad_fraction="
                        f"{cfg.data.max_bad_fraction}; the 'skipped' lines above name each shard and key. "
                        "Fix or remove those shards (or raise the limits) and run again: it resumes from the "
                        "last checkpoint"
                    )
                check_finite(mean_loss, float(grad_norm), step)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema:
                    decay = min(cfg.diffusion.ema_decay, (1 + step) / (10 + step))
                    with torch.no_grad():
                        for n, p in named:
                            ema[n].lerp_(p.detach(), 1 - decay)
                step += 1
                dt = time.perf_counter() - t0
                samples_s = cfg.optim.batch_size * accum * world / dt
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                if rank == 0:
                    with losses_file.open("a") as f:
                        row = {
                            "step": step,
                            "loss": mean_loss,
                            "grad_norm": float(grad_norm),
                            "step_time_s": dt,
                            "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                            "data_read": data_read,
                            "data_bad": data_bad,
                        }
                        f.write(json.dumps(row) + "\n")
                    if writer is not None and (step % cfg.logging.every == 0 or step == 1):
                        writer.add_scalar("loss", mean_loss, step)
                        writer.add_scalar("grad_norm", float(grad_norm), step)
                        writer.add_scalar("samples_per_s", samples_s, step)
                        writer.add_scalar("step_time_s", dt, step)
                        writer.add_scalar("memory_gib", memory_gib(device), step)
                        writer.add_scalar("data/bad_items", data_bad, step)
                        writer.add_scalar("data/bad_fraction", data_bad / max(1, data_read), step)
                        for g in optimizer.param_groups:
                            writer.add_scalar(f"lr/{g['name']}", g["lr"], step)
                if cfg.logging.sample_every and step % cfg.logging.sample_every == 0:
                    images = sample_images(
                        built,
                        [ex.prompt for ex in fixed],
                        device,
                        cfg.logging.sample_steps or preset.num_inference_steps,
                        cfg.logging.guidance_scale or preset.guidance_scale,
                        rules.resolution,
                        prediction_type,
                        cfg.optim.seed,
                    )
                    if rank == 0:
                        path = out / "samples" / f"step_{step:08d}.png"
                        save_grid(path, fixed, images, rules.resolution)
                        if writer is not None:
                            import numpy as np
                            from PIL import Image

                            writer.add_image("samples", np.asarray(Image.open(path)), step, dataformats="HWC")
                if stats[1].item() > 0:
                    stopped = "interrupted"
                    log(f"stop requested: saving at step {step}")
                    save()
                    break
                if step % cfg.checkpoint.every == 0 or step == cfg.optim.max_steps:
                    save()
        if inspect is not None:
            inspect(built)
    finally:
        stream.close()
        bar.close()
        if writer is not None:
            writer.close()
    return {"step": step, "stopped": stopped, "last_saved": last_saved}

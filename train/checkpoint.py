"""Checkpoints without pickle: per-rank safetensors of the local shards + JSON, written atomically.

Layout of ``out_dir/checkpoints/step_00000120/``:
- ``rank{r}.safetensors``: rank r's local shards (FSDP2 DTensors' ``to_local()``) of every trainable
  parameter (``model.<name>``), its AdamW state (``optim.<name>.exp_avg`` / ``.exp_avg_sq`` / ``.step``)
  and its EMA (``ema.<name>``); the safetensors metadata ``mumu.layout`` (JSON) records each parameter's
  global shape and this shard's offset in it, so an export with any process count can put the full
  tensors back together;
- ``trainer.json``: step, the LR schedule's position (the schedule itself is a pure function of the
  step and the config, so the step restores it exactly), world size, config snapshot;
- ``rank{r}.json``: that rank's data position, bad-data counters and RNG states (torch CPU/CUDA and the
  noise generator, base64 of their byte states).

Nothing in a checkpoint is unpickled: every file is safetensors or JSON. A folder in the earlier
``torch.distributed.checkpoint`` format (``.metadata``, ``*.distcp``; its metadata is a pickle) is
refused with an explanation, never read.

Resume needs the same number of processes (the local shards and data positions are per process).
The optimizer's hyperparameters are NOT restored: every parameter group takes its learning rate and
the schedule from the current config (see :data:`FIXED_ON_RESUME` for what may not change).

A checkpoint is written to ``step_N.tmp`` by every rank, then rank 0 renames it to ``step_N`` once all
ranks are done, so a killed run never leaves a half-written ``step_N`` behind; resume ignores ``.tmp``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STEP_RE = re.compile(r"^step_(\d{8})$")
FORMAT = "mumu-train-checkpoint/2"
# Config keys that decide which tensors train, what they mean or which data stream the saved position
# indexes; a resume with any of them changed cannot continue the same run and is refused.
FIXED_ON_RESUME = (
    "model.preset",
    "parts.vision.mode",
    "parts.vlm.mode",
    "parts.vlm.rank",
    "parts.vlm.alpha",
    "parts.connector.mode",
    "parts.unet.mode",
    "parts.unet.rank",
    "parts.unet.alpha",
    "diffusion.ema",
    "diffusion.prediction_type",
    "data.stage",
    "data.shards",
    "optim.seed",
)


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed or exported; the message says why and what to do."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.cpu().numpy().tobytes()).decode()

    state = {"torch": b64(torch.get_rng_state()), "noise": b64(generator.get_state())}
    if torch.cuda.is_available():
        state["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    def unb64(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()

    torch.set_rng_state(unb64(state["torch"]))
    generator.set_state(unb64(state["noise"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([unb64(s) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------------
# Local shards


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _layout(p: torch.Tensor) -> dict[str, list[int]]:
    """Global shape and this rank's offset of parameter ``p`` (a DTensor or a plain tensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return {"global_shape": list(p.shape), "offset": [0] * p.dim()}
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return {"global_shape": list(p.shape), "offset": [int(o) for o in offset]}


def _named_trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def local_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, list[int]]]]:
    """This rank's tensors to save (CPU copies) and the layout of each parameter."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict[str, list[int]]] = {}

    def put(key: str, t: torch.Tensor) -> None:
        # clone: safetensors refuses views that share storage (FSDP2's local shards are views).
        tensors[key] = _local(t).detach().to("cpu").contiguous().clone()

    for name, p in _named_trainable(model):
        layout[name] = _layout(p)
        put(f"model.{name}", p)
        if name in ema:
            put(f"ema.{name}", ema[name])
        for k, v in optimizer.state.get(p, {}).items():
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"optimizer state {name}.{k} is a {type(v).__name__}, not a tensor")
            put(f"optim.{name}.{k}", v)
    return tensors, layout


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from mumu_core.bundle import apply_umask

    save_file(tensors, str(path), metadata=metadata)
    apply_umask(path)


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    keep: int,
) -> Path:
    """Every rank calls this. Returns the final directory."""
    rank, world = dist.get_rank(), dist.get_world_size()
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    tensors, layout = local_state(model, optimizer, ema)
    meta = {
        "format": FORMAT,
        "mumu.rank": str(rank),
        "mumu.world_size": str(world),
        "mumu.layout": json.dumps(layout),
    }
    _write_safetensors(tensors, tmp / f"rank{rank}.safetensors", meta)
    (tmp / f"rank{rank}.json").write_text(json.dumps(rank_state))
    dist.barrier()
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps({"format": FORMAT, **trainer_state}, indent=2))
        if final.exists():  # a re-save of the same step (e.g. Ctrl-C right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


# ---------------------------------------------------------------------------------------------------
# Reading


def read_trainer(path: Path) -> dict[str, Any]:
    """``trainer.json`` of checkpoint ``path``, after refusing formats that would need pickle."""
    legacy = [p.name for p in path.iterdir() if p.name == ".metadata" or p.suffix == ".distcp"]
    if legacy:
        raise CheckpointError(
            f"checkpoint {path} is in the torch.distributed.checkpoint format ({', '.join(sorted(legacy))}), "
            "whose metadata is a pickle and is never loaded here (a crafted file could run code). "
            "Move that checkpoints/ folder away to start over (checkpoint.resume=false or a new out_dir), "
            "or start a new run from its export with model.init_bundle=<out_dir>/export/step_N/mumu.safetensors"
        )
    try:
        trainer = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}/trainer.json cannot be read ({e}): delete {path}") from e
    if not isinstance(trainer, dict) or trainer.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {trainer.get('format') if isinstance(trainer, dict) else None!r}, "
            f"not {FORMAT!r}: it was not written by this trainer; move it away or delete it"
        )
    return trainer


def _get(d: dict[str, Any], dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def resume_problems(trainer: dict[str, Any], cfg_dict: dict[str, Any], world: int) -> list[str]:
    """Why checkpoint state ``trainer`` cannot be continued by config ``cfg_dict`` on ``world`` processes."""
    problems = []
    if trainer.get("world_size") != world:
        problems.append(
            f"it was written by {trainer.get('world_size')} processes but this run has {world}: resume "
            "with the same number of processes (the local shards and data positions are per process)"
        )
    saved = trainer.get("config", {})
    for key in FIXED_ON_RESUME:
        a, b = _get(saved, key), _get(cfg_dict, key)
        if a != b:
            problems.append(f"{key} was {a!r} and is now {b!r}")
    return problems


def check_resumable(path: Path, cfg_dict: dict[str, Any], world: int) -> dict[str, Any]:
    """Read checkpoint ``path``'s trainer state, refusing a resume it cannot honour."""
    trainer = read_trainer(path)
    problems = resume_problems(trainer, cfg_dict, world)
    if problems:
        raise CheckpointError(
            f"cannot resume from {path}: "
            + "; ".join(problems)
            + ". Put these settings back, or start a new run (another out_dir or checkpoint.resume=false; "
            "model.init_bundle=<the export's mumu.safetensors> continues from its weights). "
            "Learning rates, the schedule, max_steps, batch size and logging may change on resume"
        )
    for r in range(world):
        for f in (f"rank{r}.safetensors", f"rank{r}.json"):
            if not (path / f).is_file():
                raise CheckpointError(f"checkpoint {path} lacks {f}: it is incomplete; delete {path}")
    return trainer


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path), framework="pt")
        meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e}): delete this checkpoint") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file: delete this checkpoint")
    return f, meta


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor],
    weights_only: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load into the (already sharded) model/optimizer/EMA in place; return (trainer, rank) states.

    Resume: this rank reads its own ``rank{r}.safetensors``; every trainable tensor must be there with
    this rank's shape. ``weights_only`` (export): any number of processes may read it; the full
    tensors are put together from every rank's file and this process takes its part; the optimizer
    and the data positions are not restored.
    """
    trainer = read_trainer(path)
    world, rank = dist.get_world_size(), dist.get_rank()
    if weights_only:
        _load_weights_any_world(path, trainer, model, ema)
        return trainer, {}
    if trainer.get("world_size") != world:
        raise CheckpointError(resume_problems(trainer, {}, world)[0])
    f, meta = _open(path / f"rank{rank}.safetensors")
    keys = set(f.keys())
    named = _named_trainable(model)
    want = {f"model.{n}" for n, _ in named} | {f"ema.{n}" for n in ema}
    missing = sorted(want - keys)
    extra = sorted(k for k in keys - want if not k.startswith("optim."))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not hold this config's trainable tensors (missing {missing[:3]}, "
            f"extra {extra[:3]}): the trained parts or LoRA settings differ; start a new run"
        )
    # Optimizer keys grouped by parameter once ("optim.<param>.<state>", the state name has no dot):
    # a lookup per parameter over all keys would be quadratic in the model size.
    optim_keys: dict[str, list[str]] = {}
    for k in keys:
        if k.startswith("optim."):
            optim_keys.setdefault(k[len("optim.") :].rpartition(".")[0], []).append(k)
    with torch.no_grad():
        for name, p in named:
            _copy_local(p, f.get_tensor(f"model.{name}"), f"model.{name}", path)
            if name in ema:
                _copy_local(ema[name], f.get_tensor(f"ema.{name}"), f"ema.{name}", path)
            prefix = f"optim.{name}."
            state = {}
            for k in optim_keys.get(name, ()):
                saved = f.get_tensor(k)
                if saved.dim() == 0:  # AdamW's step counter: a CPU scalar, not sharded
                    state[k[len(prefix) :]] = saved.clone()
                else:
                    t = torch.zeros_like(p, dtype=saved.dtype)
                    _copy_local(t, saved, k, path)
                    state[k[len(prefix) :]] = t
            if state:
                optimizer.state[p] = state
    return trainer, json.loads((path / f"rank{rank}.json").read_text())


def _copy_local(dst: torch.Tensor, src: torch.Tensor, key: str, path: Path) -> None:
    local = _local(dst)
    if tuple(local.shape) != tuple(src.shape):
        raise CheckpointError(
            f"{key} in {path} has shape {tuple(src.shape)} but this run's shard is {tuple(local.shape)}: "
            "the model differs from the one that wrote the checkpoint"
        )
    local.copy_(src.to(local.device, local.dtype))


def _load_weights_any_world(
    path: Path, trainer: dict[str, Any], model: torch.nn.Module, ema: dict[str, torch.Tensor]
) -> None:
    saved_world = int(trainer["world_size"])
    files = []
    for r in range(saved_world):
        f, meta = _open(path / f"rank{r}.safetensors")
        files.append((f, set(f.keys()), json.loads(meta["mumu.layout"])))
    named = _named_trainable(model)
    with torch.no_grad():
        for name, p in named:
            for prefix, dst in (("model", p), ("ema", ema.get(name))):
                if dst is None:
                    continue
                full = None
                for f, file_keys, layout in files:
                    key = f"{prefix}.{name}"
                    if name not in layout or key not in file_keys:
                        raise CheckpointError(f"checkpoint {path} lacks {key}: the config's model differs")
                    part = f.get_tensor(key)
                    if full is None:
                        full = torch.zeros(layout[name]["global_shape"], dtype=part.dtype)
                    idx = tuple(slice(o, o + s) for o, s in zip(layout[name]["offset"], part.shape))
                    full[idx] = part
                if tuple(full.shape) != tuple(p.shape):
                    raise CheckpointError(
                        f"{prefix}.{name} in {path} has shape {tuple(full.shape)}, the model {tuple(p.shape)}"
                    )
                mine = _layout(p)
                local = _local(dst)
                idx = tuple(slice(o, o + s) for o, s in zip(mine["offset"], local.shape))
                local.copy_(full[idx].to(local.device, local.dtype))

"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically, with a retention limit.

Layout of ``out_dir/checkpoints/step_00000120/``:
- DCP files: ``model`` (trainable parameters only, sharded), ``optim`` (AdamW state), ``ema``;
- ``trainer.json``: step, the LR schedule's position (the schedule itself is a pure function of the
  step and the config, so the step restores it exactly), world size, config snapshot;
- ``rank{r}.json``: that rank's data position and RNG states (torch CPU/CUDA and the noise generator,
  base64 of their byte states). JSON, not pickle: nothing in a checkpoint is unpickled.

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
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

STEP_RE = re.compile(r"^step_(\d{8})$")
OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Loading puts back exactly the keys that were saved (dcp.load fails on any requested key the
# checkpoint lacks); frozen parameters are absent by design, so the model-level load is not strict.
LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


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
    rank = dist.get_rank()
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    msd, osd = get_state_dict(model, optimizer, options=OPTIONS)
    dcp.save({"model": msd, "optim": osd, "ema": ema}, checkpoint_id=str(tmp))
    (tmp / f"rank{rank}.json").write_text(json.dumps(rank_state))
    dist.barrier()
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
        if final.exists():  # a re-save of the same step (e.g. Ctrl-C right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor],
    weights_only: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load into the (already sharded) model/optimizer/EMA in place; return (trainer, rank) states.

    ``weights_only``: for exporting, any number of processes may read it (DCP reshards) and the
    per-process data positions are not returned.
    """
    trainer = json.loads((path / "trainer.json").read_text())
    world = dist.get_world_size()
    if trainer["world_size"] != world and not weights_only:
        raise RuntimeError(
            f"checkpoint {path} was written by {trainer['world_size']} processes but this run has {world}: "
            "resume with the same number of processes (the data stream positions are per process), or "
            "start a new run from its exported bundle with model.init_bundle"
        )
    msd, osd = get_state_dict(model, optimizer, options=OPTIONS)
    state = {"model": msd, "optim": osd, "ema": ema}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=LOAD_OPTIONS,
    )
    if weights_only:
        return trainer, {}
    rank_file = path / f"rank{dist.get_rank()}.json"
    return trainer, json.loads(rank_file.read_text())

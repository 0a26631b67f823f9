"""Where is an attribute lost: in the conditioning, or in the UNet that renders it?

A linear probe (multinomial logistic regression) is fitted on a trained MUMU-mini model's conditioning
of held-out single-object prompts ("a <image>shape on a background") and predicts the reference's
colour and shape from it. If the probe reads an attribute from the conditioning but the generated
images do not show it (``mumu_core.mini.evaluate``), the UNet is what fails to render it.

    python -m mumu_core.mini.probe --model mumu_core/mini/weights/model --out runs/mini/probe.json

Features: the flattened context (every token, since all prompts have the same length), the pooled
vector, and as a floor the prepared reference pixels (a linear read-out of raw pixels cannot tell
shapes apart). Probes are fitted on the first ``n_train`` cases and scored on the rest; everything is
seeded, so the numbers are reproducible.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..cli_help import first_line
from ..prompt import ImageRef, InterleavedPrompt, prepare_image
from .world import COLOURS, SHAPES, object_crop, scene_at

# Far above the evaluation's indices (the demo uses 900000+), inside the held-out eval split.
PROBE_START = 500_000


@dataclass(frozen=True)
class ProbeResult:
    n_train: int
    n_test: int
    chance_colour: float
    chance_shape: float
    accuracy: dict[str, dict[str, float]]  # feature -> attribute -> held-out accuracy


def probe_cases(count: int, tokens: int) -> tuple[list[InterleavedPrompt], np.ndarray, np.ndarray]:
    """Held-out single-object prompts in the form training produces, with colour and shape labels."""
    prompts, colours, shapes = [], [], []
    for i in range(count):
        scene = scene_at("eval", PROBE_START + i, n_objects=1)
        obj = scene.objects[0]
        prompts.append(
            InterleavedPrompt(("a ", ImageRef(object_crop(scene, 0), tokens), "shape on a background"))
        )
        colours.append(COLOURS.index(obj.colour))
        shapes.append(SHAPES.index(obj.shape))
    return prompts, np.array(colours), np.array(shapes)


def linear_probe(
    features: torch.Tensor, labels: np.ndarray, n_train: int, classes: int, seed: int = 0
) -> float:
    """Held-out accuracy of a logistic regression fitted on the first ``n_train`` rows."""
    torch.manual_seed(seed)
    x = features.double()
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = ((x - mean) / std).float()
    y = torch.as_tensor(labels)
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x[:n_train]), y[:n_train]).backward()
        opt.step()
    with torch.no_grad():
        return (lin(x[n_train:]).argmax(1) == y[n_train:]).float().mean().item()


def run_probe(model: str | Path, count: int = 700, n_train: int = 500, tokens: int = 16) -> ProbeResult:
    from ..pipeline import MumuPipeline
    from .demo import model_paths

    if not 0 < n_train < count:
        raise ValueError(f"n_train must be between 0 and count ({count}), got {n_train}")
    paths = model_paths(model)  # an export (vlm/, sdxl/) or the shipped bundle + bases.json
    pipe = MumuPipeline.from_paths(paths.vlm, paths.bundle, paths.sdxl)
    prompts, colours, shapes = probe_cases(count, tokens)
    context, pooled = [], []
    with torch.no_grad():
        for p in prompts:  # one at a time, as the pipeline encodes
            c = pipe.conditioner.encode([p])
            context.append(c.context[0].flatten().float())
            pooled.append(c.pooled[0].float())
    pixels = [
        torch.from_numpy(np.asarray(prepare_image(p.images[0].image, tokens), dtype=np.float32).ravel() / 255)
        for p in prompts
    ]
    accuracy = {}
    for name, feats in (("context", context), ("pooled", pooled), ("pixels", pixels)):
        f = torch.stack(feats)
        accuracy[name] = {
            "colour": linear_probe(f, colours, n_train, len(COLOURS)),
            "shape": linear_probe(f, shapes, n_train, len(SHAPES)),
        }
    return ProbeResult(n_train, count - n_train, 1 / len(COLOURS), 1 / len(SHAPES), accuracy)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mumu_core.mini.probe", description=first_line(__doc__))
    ap.add_argument("--model", type=Path, required=True, help="a model folder: vlm/, sdxl/, mumu.safetensors")
    ap.add_argument("--count", type=int, default=700)
    ap.add_argument("--n-train", type=int, default=500)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    args = ap.parse_args(argv)
    result = run_probe(args.model, args.count, args.n_train, args.tokens)
    print(
        f"linear probe, held-out accuracy ({result.n_test} cases; chance colour {result.chance_colour:.2f}, "
        f"shape {result.chance_shape:.2f})"
    )
    for name, acc in result.accuracy.items():
        print(f"  {name:8s} colour {acc['colour']:.2f}  shape {acc['shape']:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(args.model), **asdict(result)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

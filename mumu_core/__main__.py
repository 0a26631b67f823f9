"""``python -m mumu_core``: generate, export-lora, fuse, make-tiny.

Bad input (missing or corrupt files, prompts that do not fit their images, impossible settings, an
output that is not writable or is one of the inputs) prints one ``error: ...`` line and exits with
status 2; everything is validated before any model loads, and images are written atomically, so a
failure never leaves a partial PNG or clobbers an earlier one. ``--debug`` (anywhere on the command
line) or ``MUMU_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .cli_help import first_line

EXIT_BAD_INPUT = 2
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from .bundle import BundleError
    from .encoder import EncoderLoadError
    from .mini.demo import MiniModelError
    from .pipeline import GenerationError
    from .prompt import PromptError
    from .sdxl import SDXLLoadError
    from .segment import SegmentError

    return (
        BundleError,
        EncoderLoadError,
        GenerationError,
        PromptError,
        SDXLLoadError,
        OutputError,
        SegmentError,
        MiniModelError,
    )


class OutputError(ValueError):
    """An output path cannot be written, or would overwrite an input; found before any work."""


def _probe_writable(folder: Path, what: str) -> None:
    """Prove a file can be written in ``folder``, or in the nearest existing folder above it (which
    the output will be created in), without leaving anything behind: permissions, read-only disks,
    a file where a folder should be."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what} {folder}: {existing} is a file, not a folder; choose another path")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".mumu-write-check-"):
            pass
    except OSError as e:
        raise OutputError(
            f"{what} {folder} cannot be written ({existing}: {e.strerror or e}): choose another path "
            "or fix its permissions"
        ) from None


def check_output_file(out: Path, inputs: Sequence[Path], suffix: str = ".safetensors") -> None:
    """``out`` is a new or replaceable file, never one of ``inputs``, and its folder is writable."""
    if out.suffix != suffix:
        raise OutputError(f"--out {out} must end in {suffix}")
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder: give a file path ending in {suffix}")
    for src in inputs:
        if out.resolve() == src.resolve() or (out.exists() and src.exists() and out.samefile(src)):
            raise OutputError(f"--out {out} is the input {src}: refusing to overwrite it; give another path")
    _probe_writable(out.parent, "the folder of --out")


class _ImageAction(argparse.Action):
    """--image: appends the path, and an empty --segment slot for it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace.image = [*(namespace.image or []), values]
        namespace.segments = [*(getattr(namespace, "segments", None) or []), None]


class _SegmentAction(argparse.Action):
    """--segment PHRASE: applies to the --image just before it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        segments = list(getattr(namespace, "segments", None) or [])
        if not segments:
            parser.error("--segment PHRASE applies to the --image before it: give --image first")
        if segments[-1] is not None:
            parser.error(f"--image {namespace.image[-1]} already has --segment {segments[-1]!r}")
        segments[-1] = values
        namespace.segments = segments


def _resolve_models(args: argparse.Namespace) -> None:
    """--mini fills --vlm/--bundle/--sdxl with the embedded model; otherwise all three are required."""
    if args.mini:
        given = [f"--{k}" for k in ("vlm", "bundle", "sdxl") if getattr(args, k) is not None]
        if given:
            raise OutputError(f"--mini uses the embedded model: drop {' '.join(given)}")
        from .mini.demo import model_paths, verify_model

        verify_model()
        paths = model_paths()
        args.vlm, args.bundle, args.sdxl = paths.vlm, paths.bundle, paths.sdxl
        if args.out is None:
            args.out = Path("outputs") / "mini"
        return
    missing = [f"--{k}" for k in ("vlm", "bundle", "sdxl", "out") if getattr(args, k) is None]
    if missing:
        raise OutputError(
            f"missing {' '.join(missing)}: give the model files (or --mini for the embedded MUMU-mini model)"
        )


def _references(args: argparse.Namespace, load_image) -> tuple[list, list]:
    """The --image pictures and their masks: segmented by --segment PHRASE where given, else unmasked."""
    images = [load_image(p) for p in args.image]
    segments = getattr(args, "segments", None) or [None] * len(images)
    masks: list = [None] * len(images)
    if not any(segments):
        return images, masks
    from .segment import ReferenceSegmenter, SegmentError, check_detector_folder, check_sam_folder

    if args.detector is None or args.sam is None:
        raise SegmentError("--segment needs --detector (GroundingDINO folder) and --sam (SAM folder)")
    check_detector_folder(args.detector)
    check_sam_folder(args.sam)
    segmenter = ReferenceSegmenter.from_pretrained(args.detector, args.sam)
    for i, phrase in enumerate(segments):
        if phrase is not None:
            try:
                s = segmenter.segment(images[i], phrase)
            except SegmentError as e:
                raise SegmentError(f"--image {args.image[i]} --segment {phrase!r}: {e}") from None
            print(
                f"segmented {phrase!r} in {args.image[i]}: box {list(s.box)}, score {s.score:.2f}",
                file=sys.stderr,
            )
            images[i], masks[i] = s.image, s.mask
    return images, masks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mumu_core", description=first_line(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from an interleaved text+image prompt")
    g.add_argument(
        "--mini",
        action="store_true",
        help="use the embedded MUMU-mini model (no downloads, CPU, 24 px; instead of --vlm/--bundle/--sdxl)",
    )
    g.add_argument("--vlm", type=Path, help="Idefics2 folder (e.g. idefics2-8b)")
    g.add_argument("--bundle", type=Path, help="MUMU bundle .safetensors")
    g.add_argument("--sdxl", type=Path, help="SDXL single .safetensors or diffusers folder")
    g.add_argument("--prompt", required=True, help='e.g. "a <image> man and his <image> dog"')
    g.add_argument(
        "--image", action=_ImageAction, default=[], type=Path, help="reference image, in prompt order"
    )
    g.add_argument(
        "--segment",
        action=_SegmentAction,
        metavar="PHRASE",
        help="cut the subject PHRASE out of the --image given just before (GroundingDINO + SAM; needs "
        "--detector and --sam), as the paper segments its references",
    )
    g.add_argument("--detector", type=Path, help="GroundingDINO folder for --segment")
    g.add_argument("--sam", type=Path, help="SAM folder (transformers format) for --segment")
    g.add_argument("--out", type=Path, help="output folder for the PNGs (default with --mini: outputs/mini)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the preset's, 50 for real)")
    g.add_argument(
        "--cfg", type=float, default=None, help="guidance scale (default: the preset's, 6 for real)"
    )
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--batch", type=int, default=1, help="images to generate")
    g.add_argument("--tokens-per-image", type=int, default=None, help="square number (default: the bundle's)")
    g.add_argument("--preset", choices=["real", "tiny", "mini"], default=None, help="default: the bundle's")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--lora-scale", type=float, default=1.0, help="strength of the bundle's UNet LoRA")

    e = sub.add_parser(
        "export-lora", help="write the bundle's UNet LoRA as a kohya LoRA (ComfyUI, diffusers)"
    )
    e.add_argument("--bundle", required=True, type=Path)
    e.add_argument("--out", required=True, type=Path, help="output .safetensors")

    f = sub.add_parser("fuse", help="merge the bundle's UNet LoRA into an SDXL checkpoint (one .safetensors)")
    f.add_argument("--bundle", required=True, type=Path)
    f.add_argument("--sdxl", required=True, type=Path, help="SDXL single .safetensors or diffusers folder")
    f.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output .safetensors (or a new folder, for a diffusers folder input)",
    )
    f.add_argument("--scale", type=float, default=1.0)

    t = sub.add_parser("make-tiny", help="write a tiny random model set (for demos and tests)")
    t.add_argument("outdir", type=Path)
    t.add_argument("--preset", choices=["tiny", "mini"], default="tiny")
    t.add_argument(
        "--segmenter", action="store_true", help="also write a tiny GroundingDINO and SAM (for --segment)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MUMU_DEBUG", "") not in ("", "0")
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    if debug:
        return {"generate": _generate, "export-lora": _export, "fuse": _fuse, "make-tiny": _make_tiny}[
            args.command
        ](args)
    try:
        return {"generate": _generate, "export-lora": _export, "fuse": _fuse, "make-tiny": _make_tiny}[
            args.command
        ](args)
    except _user_errors() as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .bundle import BundleMismatchError, load_bundle
    from .encoder import check_vlm_folder
    from .pipeline import GenerationError, MumuPipeline, resolve_settings
    from .presets import get_preset
    from .prompt import InterleavedPrompt, load_image
    from .sdxl import SDXLLoadError

    # Everything cheap is checked before any model loads.
    _resolve_models(args)
    bundle = load_bundle(args.bundle)
    tokens = args.tokens_per_image or bundle.meta.tokens_per_image
    # Placeholders against the image count first: a prompt that cannot fit fails before segmentation.
    InterleavedPrompt.parse(args.prompt, [load_image(p) for p in args.image], tokens_per_image=tokens)
    images, masks = _references(args, load_image)
    prompt = InterleavedPrompt.parse(args.prompt, images, tokens_per_image=tokens, masks=masks)
    from .encoder import check_prompt_text

    check_prompt_text(prompt)  # Idefics2's control tokens typed as text (the tokenizer checks again)
    if args.preset is not None and args.preset != bundle.meta.preset:
        raise BundleMismatchError(
            f"--preset {args.preset!r} but the bundle was made for preset {bundle.meta.preset!r}: "
            "drop --preset or use a bundle of that preset"
        )
    resolve_settings(
        get_preset(bundle.meta.preset), args.steps, args.cfg, args.width, args.height, args.batch
    )
    check_vlm_folder(args.vlm)
    if not args.sdxl.exists():
        raise SDXLLoadError(f"SDXL path {args.sdxl} does not exist")
    if args.out.exists() and not args.out.is_dir():
        raise GenerationError(f"--out {args.out} is a file: give a folder for the PNGs")
    _probe_writable(args.out, "--out")  # before sampling: an unwritable folder must not cost the work
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise GenerationError(f"--device {device} but no CUDA device is available: use --device cpu")
    dtype = getattr(torch, DTYPES[args.dtype])

    pipe = MumuPipeline.from_paths(
        args.vlm,
        bundle,
        args.sdxl,
        preset=args.preset,
        dtype=dtype,
        device=device,
        lora_scale=args.lora_scale,
    )
    result = pipe(
        prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.cfg,
        width=args.width,
        height=args.height,
        batch=args.batch,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for img in result:
        print(save_png_atomic(img, args.out, f"mumu-s{args.seed}"))
    return 0


def save_png_atomic(image, folder: Path, stem: str) -> Path:
    """Write ``image`` as ``<stem>-NNNN.png`` under the first free number, via a temp file + rename."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".mumu-", suffix=".png.tmp")
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        from .bundle import apply_umask

        apply_umask(tmp)  # mkstemp's 0600 would hide the image from other users
        for n in range(100000):
            target = folder / f"{stem}-{n:04d}.png"
            try:
                # link() fails if the name exists, so an earlier image is never overwritten.
                os.link(tmp, target)
                return target
            except FileExistsError:
                continue
        raise RuntimeError(f"no free file name for {stem}-NNNN.png in {folder}")
    finally:
        Path(tmp).unlink(missing_ok=True)


def _export(args: argparse.Namespace) -> int:
    from .bundle import export_kohya_unet_lora, load_bundle

    check_output_file(args.out, [args.bundle])
    print(export_kohya_unet_lora(load_bundle(args.bundle), args.out))
    return 0


def _fuse(args: argparse.Namespace) -> int:
    from .bundle import fuse_unet_lora_into_checkpoint, load_bundle

    if args.sdxl.is_dir() and args.out.suffix == "":
        # A diffusers folder in, a new diffusers folder out (the bundle module refuses existing folders).
        if args.out.exists():
            raise OutputError(f"--out {args.out} exists: give a new folder name (nothing is overwritten)")
        _probe_writable(args.out.parent if args.out.parent.exists() else Path("."), "the folder of --out")
    else:
        check_output_file(args.out, [args.bundle, args.sdxl])
    print(fuse_unet_lora_into_checkpoint(load_bundle(args.bundle), args.sdxl, args.out, args.scale))
    return 0


def _print_tiny_curate(root: Path) -> None:
    """The real-photo curate models (classifiers, person detector, LLaVA-NeXT) and a dry-run command."""
    from .data.curate_tiny import build_tiny_curate_models

    c = build_tiny_curate_models(root / "curate")
    print(
        f"curate: python -m mumu_core.data curate --input {root / 'images'} --out {root / 'curated'} "
        f"--sfw-model {c['sfw']} --watermark-model {c['watermark']} --people-model {c['people']} "
        f"--caption-model {c['llava']} --people-threshold 0.9 --min-short-side 16 --min-megapixels 0 --caption-max-tokens 8"
    )


def _make_tiny(args: argparse.Namespace) -> int:
    from .testing import build_tiny_models

    _probe_writable(args.outdir, "make-tiny's folder")
    if args.segmenter:
        from .data.tiny import build_tiny_grounding_dino, build_tiny_sam

        det = build_tiny_grounding_dino(args.outdir / "grounding-dino")
        sam = build_tiny_sam(args.outdir / "sam")
        print(f"detector: {det}\nsam:    {sam}  (random: use them to exercise --segment, not to judge it)")
    try:
        m = build_tiny_models(args.outdir, args.preset)
    except FileExistsError as e:  # a folder of something else: never overwritten
        raise OutputError(str(e)) from None
    sdxl = m.sdxl_single_file or m.sdxl
    print(f"vlm:    {m.vlm}\nsdxl:   {m.sdxl}\nsingle: {m.sdxl_single_file}\nbundle: {m.bundle}")
    print(
        f"try: python -m mumu_core generate --vlm {m.vlm} --bundle {m.bundle} --sdxl {sdxl} "
        f'--prompt "a <image> man and his <image> dog" --image {m.images[0]} --image {m.images[1]} '
        f"--out {m.root / 'out'} --steps 4"
        + (f" --segment dog --detector {det} --sam {sam}" if args.segmenter else "")
    )
    _print_tiny_curate(m.root)
    if m.pickscore is not None and m.llm is not None:
        print(f"pickscore: {m.pickscore}\nllm:    {m.llm}")
        if m.sdxl_single_file is not None:  # the tiny preset's sdxl/ is a full text-to-image pipeline
            print(
                f"data: python -m mumu_core.data prompts --out {m.root / 'prompts.jsonl'} --styles-per-content 2 "
                f"&& python -m mumu_core.data synth --prompts {m.root / 'prompts.jsonl'} --sdxl {m.sdxl} "
                f"--pickscore {m.pickscore} --min-pickscore -100 --steps 2 --out {m.root / 'synth'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

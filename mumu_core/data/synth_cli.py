"""The ``prompts``, ``synth`` and ``score`` subcommands of ``python -m mumu_core.data`` (docs/DATA.md).

Every input is checked before a model loads; bad input prints ``error: ...`` and exits 2. Ctrl-C or
SIGTERM stops with exit 130 after removing the unfinished part's temp file (finished parts stay).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

COMMANDS = ("prompts", "synth", "score")


def add_commands(sub) -> None:
    from .prompts import PromptsConfig
    from .synth import ScoreConfig, SynthConfig

    pd, sd, qd = PromptsConfig(), SynthConfig(), ScoreConfig()
    p = sub.add_parser(
        "prompts", help="content x style prompt table (starter lists, LLM extraction/generation)"
    )
    p.add_argument("--out", required=True, help="prompt table to write: .jsonl or .parquet (+ .stats.json)")
    p.add_argument(
        "--styles-per-content", type=int, default=pd.styles_per_content, help="K styles per content"
    )
    p.add_argument("--seed", type=int, default=pd.seed)
    p.add_argument("--no-starter", action="store_true", help="leave out the shipped starter lists")
    p.add_argument("--contents", nargs="*", default=[], help="more content list files (one a line)")
    p.add_argument("--styles", nargs="*", default=[], help="more style list files (one a line)")
    p.add_argument(
        "--extract-from", nargs="*", default=[], help="prompt tables (parquet/CSV/JSONL) for the LLM"
    )
    p.add_argument("--prompt-column", help="column of the prompts (default: prompt/text/caption)")
    p.add_argument("--max-source-prompts", type=int, help="read at most this many distinct prompts a table")
    p.add_argument("--generate-contents", type=int, default=0, help="new contents the LLM writes")
    p.add_argument("--generate-styles", type=int, default=0, help="new styles the LLM writes")
    p.add_argument(
        "--llm", help="local instruction causal-LM folder (needed by --extract-from / --generate-*)"
    )
    p.add_argument("--max-contents", type=int, help="keep the first N contents (pilot or dry runs)")
    p.add_argument("--llm-batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out table")

    s = sub.add_parser("synth", help="prompt table -> SDXL images -> PickScore filter -> webdataset shards")
    s.add_argument("--prompts", required=True, help="prompt table from `prompts` (.jsonl/.parquet)")
    s.add_argument(
        "--out", required=True, help="output folder (shards, per-shard stats, manifest, histogram)"
    )
    s.add_argument("--sdxl", required=True, help="diffusers SDXL folder or single .safetensors")
    s.add_argument("--text-encoders", help="single file: diffusers SDXL folder holding the text encoders")
    s.add_argument("--preset", default=sd.preset, choices=["real", "tiny"], help="single file: UNet layout")
    _add_scorer_args(s, sd.min_pickscore)
    s.add_argument("--no-pickscore", action="store_true", help="keep every finite, non-black image unscored")
    s.add_argument("--steps", type=int, default=sd.steps)
    s.add_argument("--guidance", type=float, default=sd.guidance)
    s.add_argument("--resolution", type=int, help="base side (default: the model's, 1024 for SDXL)")
    s.add_argument("--aspect", choices=["sdxl", "square"], default=sd.aspect)
    s.add_argument("--batch-size", type=int, default=sd.batch_size)
    s.add_argument("--prompts-per-shard", type=int, default=sd.prompts_per_shard)
    s.add_argument("--seed", type=int, default=sd.seed)
    s.add_argument("--dtype", default=sd.dtype, choices=["auto", "float32", "float16", "bfloat16"])
    s.add_argument("--device", default=sd.device)
    _add_exec_args(s)

    q = sub.add_parser("score", help="PickScore existing webdataset shards; keep >= --min-pickscore")
    q.add_argument("--input", nargs="+", required=True, help="tar shards or folders of them")
    q.add_argument("--out", required=True, help="output folder (scored shards, stats, manifest, histogram)")
    _add_scorer_args(q, qd.min_pickscore, required=True)
    q.add_argument("--batch-size", type=int, default=qd.batch_size)
    q.add_argument("--dtype", default=qd.dtype, choices=["auto", "float32", "float16", "bfloat16"])
    q.add_argument("--device", default=qd.device)
    _add_exec_args(q)


def _add_scorer_args(p, default_min: float, required: bool = False) -> None:
    p.add_argument("--pickscore", required=required, help="local PickScore CLIPModel folder (PickScore_v1)")
    p.add_argument("--pickscore-processor", help="CLIPProcessor folder (default: the --pickscore folder)")
    p.add_argument("--min-pickscore", type=float, default=default_min, help="keep images scoring >= this")


def _add_exec_args(p) -> None:
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--ray-address", help="join a running Ray cluster (implies --executor ray)")
    p.add_argument("--num-workers", type=int, help="Ray actors (default: one per GPU, or 1 without GPUs)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from .llm import LLMLoadError
    from .pickscore import ScorerLoadError
    from .prompts import PromptSetError
    from .synth import SynthError

    def stop(signum, frame):  # SIGTERM (a scheduler, kill) ends like Ctrl-C: temp files removed
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # signals work only there
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        return {"prompts": _prompts, "synth": _synth, "score": _score}[args.cmd](args)
    except KeyboardInterrupt:
        print(
            "interrupted: finished shards are kept, the unfinished part was discarded; "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    except (PromptSetError, SynthError, LLMLoadError, ScorerLoadError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # the resume guard (another config in that folder), SDXL layout errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _prompts(args) -> int:
    from .llm import InstructLLM, check_llm_folder
    from .prompts import (
        PromptsConfig,
        build_prompt_set,
        check_output,
        read_prompt_column,
        stats_path,
        write_prompt_set,
    )

    cfg = PromptsConfig(
        styles_per_content=args.styles_per_content,
        seed=args.seed,
        starter=not args.no_starter,
        content_files=list(args.contents),
        style_files=list(args.styles),
        tables=list(args.extract_from),
        prompt_column=args.prompt_column,
        max_source_prompts=args.max_source_prompts,
        generate_contents=args.generate_contents,
        generate_styles=args.generate_styles,
        llm=args.llm,
        max_contents=args.max_contents,
    )
    check_output(args.out, args.overwrite)
    for f in cfg.content_files + cfg.style_files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"list file {f} does not exist")
    for t in cfg.tables:  # cheap: an empty or columnless table fails before the LLM loads
        read_prompt_column(t, cfg.prompt_column, 1)
    llm = None
    if cfg.tables or cfg.generate_contents or cfg.generate_styles:
        if not args.llm:
            raise FileNotFoundError(
                "--extract-from / --generate-* need --llm: a local instruction LLM folder"
            )
        check_llm_folder(args.llm)
        llm = InstructLLM.from_pretrained(
            args.llm, args.device, "auto", args.llm_batch_size, args.max_new_tokens
        )
    rows, stats = build_prompt_set(cfg, llm)
    write_prompt_set(rows, stats, args.out)
    summary = {k: v for k, v in stats.items() if k != "config"}
    print(json.dumps({"out": args.out, "stats": str(stats_path(args.out)), **summary}))
    return 0


def _synth(args) -> int:
    from .synth import SynthConfig, SynthError, synth

    if not args.pickscore and not args.no_pickscore:
        raise SynthError("pass --pickscore FOLDER (the PickScore_v1 CLIPModel) or --no-pickscore to keep all")
    cfg = SynthConfig(
        sdxl=args.sdxl,
        text_encoders=args.text_encoders,
        preset=args.preset,
        pickscore=None if args.no_pickscore else args.pickscore,
        pickscore_processor=args.pickscore_processor,
        min_pickscore=args.min_pickscore,
        steps=args.steps,
        guidance=args.guidance,
        resolution=args.resolution,
        aspect=args.aspect,
        batch_size=args.batch_size,
        prompts_per_shard=args.prompts_per_shard,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
    )
    executor = "ray" if args.ray_address else args.executor
    m = synth(args.prompts, args.out, cfg, executor, args.ray_address, args.num_workers, not args.no_progress)
    print(json.dumps({"out": args.out, **m["counts"], "parts": m["parts"], "run": m["runs"][-1]}))
    return 1 if m["parts"]["failed"] else 0


def _score(args) -> int:
    from .synth import ScoreConfig, score_shards

    cfg = ScoreConfig(
        pickscore=args.pickscore,
        pickscore_processor=args.pickscore_processor,
        min_pickscore=args.min_pickscore,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )
    executor = "ray" if args.ray_address else args.executor
    m = score_shards(
        args.input, args.out, cfg, executor, args.ray_address, args.num_workers, not args.no_progress
    )
    print(json.dumps({"out": args.out, **m["counts"], "parts": m["parts"], "errors": len(m["errors"])}))
    return 1 if m["parts"]["failed"] else 0

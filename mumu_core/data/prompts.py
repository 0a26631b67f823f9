"""The prompt set of the synthetic data: contents x styles (MUMU section 3.1).

A content says what is in the picture ("a man and a dog hiking in the wilderness during the day"), a
style how it is rendered ("Abstract, geometric, modernist, Cubist influences"); the caption is
``"{content}, {style}"``. Each content is paired with ``styles_per_content`` styles so that the model
sees one content in many styles and learns to keep the two apart.

Sources, in this order (earlier wins on duplicates): the starter lists shipped in ``prompt_lists/``,
the user's own list files, contents/styles extracted from a prompt table (DiffusionDB metadata or any
parquet/CSV/JSONL with a prompt column) by a local instruction LLM, and new ones the LLM invents.

Output: a JSONL or parquet table, one row per prompt:
``{"id": "p00000012", "content_id": "c000003", "style_id": "s00041", "content", "style", "caption"}``,
plus ``<out stem>.stats.json``.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from .shards import ensure_writable_folder, write_bytes_atomic, write_json_atomic

PROMPT_COLUMNS = ("prompt", "text", "caption", "TEXT")
TABLE_COLUMNS = ("id", "content_id", "style_id", "content", "style", "caption")
MIN_CHARS = 3


class PromptSetError(ValueError):
    """Bad input of the prompt-set builder (empty table, missing column, unwritable output, ...)."""


@dataclass
class PromptsConfig:
    styles_per_content: int = 8
    seed: int = 0
    starter: bool = True  # include the shipped starter lists
    content_files: list[str] = field(default_factory=list)  # extra lists, one item a line
    style_files: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)  # prompt tables to extract from (needs llm)
    prompt_column: str | None = None  # default: the first of PROMPT_COLUMNS present
    max_source_prompts: int | None = None  # read at most this many (distinct) prompts
    generate_contents: int = 0  # new contents the LLM invents
    generate_styles: int = 0
    llm: str | None = None  # local causal-LM folder
    max_contents: int | None = None  # keep the first N contents (a pilot run, a dry run)


# -- normalisation ----------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """One line, single spaces, no wrapping quotes or trailing punctuation; case is kept."""
    t = unicodedata.normalize("NFKC", text).replace("\n", " ").strip()
    t = re.sub(r"\s+", " ", t)
    t = t.strip(" \"'`")
    t = re.sub(r"[\s,;:.!]+$", "", t)
    t = re.sub(r"\s+,", ",", t)
    return t


def dedup_key(text: str) -> str:
    """Two items are the same when they differ only in case, punctuation and spacing."""
    return " ".join(re.findall(r"[^\W_]+", text.casefold()))


def add_unique(pool: list[str], seen: set[str], items: Sequence[str]) -> tuple[int, int]:
    """Append normalised, not-yet-seen items to ``pool``; return (added, duplicates or too short)."""
    added = dropped = 0
    for raw in items:
        t = normalise(raw)
        k = dedup_key(t)
        if len(t) < MIN_CHARS or not k or k in seen:
            dropped += 1
            continue
        seen.add(k)
        pool.append(t)
        added += 1
    return added, dropped


def read_list(path: str | os.PathLike) -> list[str]:
    """A list file: one item a line; blank lines and lines starting with '#' are skipped."""
    lines = Path(path).read_text("utf-8").splitlines()
    return [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def starter_lists() -> tuple[list[str], list[str]]:
    """The contents and styles shipped with the project (``mumu_core/data/prompt_lists``)."""
    base = resources.files("mumu_core.data") / "prompt_lists"
    return (
        [ln for ln in (base / "contents.txt").read_text("utf-8").splitlines() if ln and ln[0] != "#"],
        [ln for ln in (base / "styles.txt").read_text("utf-8").splitlines() if ln and ln[0] != "#"],
    )


# -- prompt tables ----------------------------------------------------------------------------------


def read_prompt_column(
    path: str | os.PathLike, column: str | None = None, limit: int | None = None
) -> list[str]:
    """The distinct non-empty prompts of a parquet / CSV / JSONL table, in table order."""
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"prompt table {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        col = _pick_column(names, column, path)
        values = pq.read_table(path, columns=[col]).column(col).to_pylist()
    elif suffix == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            col = _pick_column(reader.fieldnames or [], column, path)
            values = [row.get(col) for row in reader]
    elif suffix in (".jsonl", ".json"):
        values, col = [], None
        for n, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise PromptSetError(f"{path} line {n} is not JSON ({e}): give one JSON object a line") from e
            if col is None:
                col = _pick_column(list(row), column, path)
            values.append(row.get(col))
    else:
        raise PromptSetError(f"{path}: prompt tables must be .parquet, .csv or .jsonl")
    seen: set[str] = set()
    out = []
    for v in values:
        if isinstance(v, str) and v.strip() and v not in seen:
            seen.add(v)
            out.append(v)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise PromptSetError(f"prompt table {path} has no non-empty prompts in column {col!r}")
    return out


def _pick_column(names: Sequence[str], column: str | None, path: Path) -> str:
    if column is not None:
        if column not in names:
            raise PromptSetError(f"{path} has no column {column!r} (columns: {list(names)})")
        return column
    for c in PROMPT_COLUMNS:
        if c in names:
            return c
    raise PromptSetError(f"{path} has none of the prompt columns {PROMPT_COLUMNS}: pass --prompt-column")


# -- pairing and the table --------------------------------------------------------------------------


def pair(contents: Sequence[str], styles: Sequence[str], k: int, seed: int) -> list[dict]:
    """Each content with ``k`` distinct styles, drawn by a generator seeded with (seed, content text),
    so adding contents never changes the styles of the others."""
    if k < 1:
        raise PromptSetError(f"styles_per_content must be >= 1, got {k}")
    if k > len(styles):
        raise PromptSetError(f"styles_per_content={k} but only {len(styles)} styles: lower it or add styles")
    rows = []
    for ci, content in enumerate(contents):
        rng = random.Random(f"{seed}/{content}")
        for si in sorted(rng.sample(range(len(styles)), k)):
            rows.append(
                {
                    "id": f"p{len(rows):08d}",
                    "content_id": f"c{ci:06d}",
                    "style_id": f"s{si:05d}",
                    "content": content,
                    "style": styles[si],
                    "caption": f"{content}, {styles[si]}",
                }
            )
    return rows


def stats_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".stats.json")


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before any work when ``out`` cannot be written or would replace a table."""
    out = Path(out)
    if out.suffix.lower() not in (".jsonl", ".parquet"):
        raise PromptSetError(f"--out {out} must end in .jsonl or .parquet")
    if out.exists() and not overwrite:
        raise PromptSetError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    try:
        ensure_writable_folder(out.parent)
    except PermissionError as e:
        raise PromptSetError(f"{e}: choose another --out") from e
    return out


def write_table(rows: Sequence[dict], out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.table({c: [r[c] for r in rows] for c in TABLE_COLUMNS}), buf)
        write_bytes_atomic(out, buf.getvalue())
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        write_bytes_atomic(out, data.encode("utf-8"))
    return out


def read_table(path: str | os.PathLike) -> list[dict]:
    """Rows of a prompt table written by ``write_table`` (or any table with id + caption columns)."""
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(
            f"prompt table {path} does not exist: make one with `python -m mumu_core.data prompts`"
        )
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        rows = []
        for n, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise PromptSetError(f"{path} line {n} is not JSON ({e})") from e
    if not rows:
        raise PromptSetError(
            f"prompt table {path} is empty: make one with `python -m mumu_core.data prompts`"
        )
    seen: set[str] = set()
    for i, r in enumerate(rows):
        if not isinstance(r.get("id"), str) or not isinstance(r.get("caption"), str):
            raise PromptSetError(f"{path} row {i} lacks a string 'id' or 'caption'")
        if "." in r["id"] or "/" in r["id"] or r["id"] in seen:
            raise PromptSetError(f"{path} row {i}: id {r['id']!r} is repeated or contains '.' or '/'")
        seen.add(r["id"])
    return rows


def build_prompt_set(cfg: PromptsConfig, llm=None) -> tuple[list[dict], dict]:
    """Gather, normalise, de-duplicate and pair; ``llm`` (an ``InstructLLM``) for tables / generation."""
    from .llm import extract_content_style, generate_items

    contents: list[str] = []
    styles: list[str] = []
    seen_c: set[str] = set()
    seen_s: set[str] = set()
    stats: dict = {
        "contents": {},
        "styles": {},
        "duplicates_or_empty": {"contents": 0, "styles": 0},
        "llm": None,
    }

    def add(kind: str, source: str, items: Sequence[str]) -> None:
        pool, seen = (contents, seen_c) if kind == "contents" else (styles, seen_s)
        added, dropped = add_unique(pool, seen, items)
        stats[kind][source] = stats[kind].get(source, 0) + added
        stats["duplicates_or_empty"][kind] += dropped

    if cfg.starter:
        sc, ss = starter_lists()
        add("contents", "starter", sc)
        add("styles", "starter", ss)
    for f in cfg.content_files:
        add("contents", "files", read_list(f))
    for f in cfg.style_files:
        add("styles", "files", read_list(f))
    needs_llm = bool(cfg.tables) or cfg.generate_contents > 0 or cfg.generate_styles > 0
    if needs_llm:
        if llm is None:
            raise PromptSetError("extraction from tables and generation need a local LLM: pass --llm FOLDER")
        llm_stats: dict = {"source_prompts": 0, "answers": 0, "malformed": 0, "malformed_examples": []}
        source_prompts: list[str] = []
        for t in cfg.tables:
            source_prompts += read_prompt_column(t, cfg.prompt_column, cfg.max_source_prompts)
        if source_prompts:
            good, bad = extract_content_style(llm, source_prompts)
            add("contents", "extracted", [g["content"] for g in good])
            add("styles", "extracted", [g["style"] for g in good if g["style"].strip()])
            llm_stats["source_prompts"] = len(source_prompts)
            _count_llm(llm_stats, good, bad)
        for kind, n, pool in (
            ("content", cfg.generate_contents, contents),
            ("style", cfg.generate_styles, styles),
        ):
            if n > 0:
                good, bad = generate_items(llm, kind, n, pool or ["a cat on a sofa"], seed=cfg.seed)
                add(kind + "s", "generated", good)
                _count_llm(llm_stats, good, bad)
        stats["llm"] = llm_stats
    if not contents:
        raise PromptSetError("no contents: keep the starter lists or give --contents files / a prompt table")
    if not styles:
        raise PromptSetError("no styles: keep the starter lists or give --styles files / a prompt table")
    if cfg.max_contents is not None:
        contents = contents[: cfg.max_contents]
    rows = pair(contents, styles, cfg.styles_per_content, cfg.seed)
    stats["contents"]["total"] = len(contents)
    stats["styles"]["total"] = len(styles)
    stats.update(prompts=len(rows), styles_per_content=cfg.styles_per_content, seed=cfg.seed)
    stats["config"] = asdict(cfg)
    return rows, stats


def _count_llm(llm_stats: dict, good: Sequence, bad: Sequence[str]) -> None:
    llm_stats["answers"] += len(good) + len(bad)
    llm_stats["malformed"] += len(bad)
    room = 5 - len(llm_stats["malformed_examples"])
    llm_stats["malformed_examples"] += [b[:200] for b in bad[: max(0, room)]]


def write_prompt_set(rows: Sequence[dict], stats: dict, out: str | os.PathLike) -> Path:
    """The table, then its statistics (both atomic)."""
    write_table(rows, out)
    write_json_atomic(stats_path(out), stats)
    return Path(out)

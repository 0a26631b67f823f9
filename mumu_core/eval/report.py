"""Writing results: per-case and per-image CSV, one JSON with everything, an HTML page and a PNG grid."""

from __future__ import annotations

import csv
import html
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mumu_core.eval.metrics import METRICS, CaseScores, aggregate, aggregate_by_group

THUMB = 160
GRID_MAX_ROWS = 64  # a PNG taller than this is unwieldy; the HTML page has every case


def _fmt(v) -> str:
    return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def write_results(
    results: Sequence[CaseScores], out_dir: str | Path, info: dict | None = None
) -> dict[str, Path]:
    """results.json, cases.csv, images.csv, aggregate.csv, report.html, grid.png under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(results)
    groups = aggregate_by_group(results)
    data = {"info": info or {}, "aggregate": agg, "groups": groups, "cases": [r.to_dict() for r in results]}
    paths = {"json": out / "results.json"}
    paths["json"].write_text(json.dumps(data, indent=1) + "\n")

    case_cols = [
        "id",
        "group",
        "prompt",
        *METRICS,
        "objects_found",
        "objects_missing",
        "faces_found",
        "faces_missing",
    ]
    paths["cases_csv"] = out / "cases.csv"
    with open(paths["cases_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(case_cols)
        for r in results:
            d = r.to_dict()
            w.writerow([_fmt(d[c]) for c in case_cols])

    paths["images_csv"] = out / "images.csv"
    with open(paths["images_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "case",
                "image",
                "seed",
                *METRICS,
                "objects_found",
                "objects_missing",
                "faces_found",
                "faces_missing",
            ]
        )
        for r in results:
            for i in r.images:
                w.writerow([r.case.id, i.image, _fmt(i.seed), *(_fmt(getattr(i, m)) for m in METRICS),
                            i.objects_found, i.objects_missing, i.faces_found, i.faces_missing])  # fmt: skip

    paths["aggregate_csv"] = out / "aggregate.csv"
    with open(paths["aggregate_csv"], "w", newline="") as f:
        w = csv.writer(f)
        keys = list(agg)
        w.writerow(["group", *keys])
        w.writerow(["(all)", *(_fmt(agg[k]) for k in keys)])
        for g, a in groups.items():
            w.writerow([g, *(_fmt(a[k]) for k in keys)])

    paths["html"] = write_html(results, agg, out)
    paths["grid"] = write_grid(results, out / "grid.png")
    return paths


OBJECT_COLOUR, FACE_COLOUR = (255, 40, 40), (40, 200, 255)


def _thumb(path: str | Path, boxes: Sequence[tuple[Sequence[float], tuple]] = ()) -> Image.Image:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except OSError:
        im = Image.new("RGB", (THUMB, THUMB), (80, 0, 0))
        boxes = ()
    scale = THUMB / max(im.size)
    t = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
    draw = ImageDraw.Draw(t)
    for b, colour in boxes:
        draw.rectangle([v * scale for v in b], outline=colour, width=2)
    canvas = Image.new("RGB", (THUMB, THUMB), (32, 32, 32))
    canvas.paste(t, ((THUMB - t.width) // 2, (THUMB - t.height) // 2))
    return canvas


def _image_boxes(img) -> list:
    return [(o["box"], OBJECT_COLOUR) for o in img.objects if o["found"]] + [
        (f["box"], FACE_COLOUR) for f in img.faces if f["found"]
    ]


def _caption_parts(img) -> list[str]:
    parts = [f"{m}={getattr(img, m):.3f}" for m in METRICS if getattr(img, m) is not None]
    if img.objects_missing:
        parts.append(f"objects missing: {img.objects_missing}")
    if img.faces_missing:
        parts.append(f"faces missing: {img.faces_missing}")
    return parts


def _image_caption(img) -> str:
    return " ".join(_caption_parts(img))


def write_html(results: Sequence[CaseScores], agg: dict, out: Path) -> Path:
    """A page of references beside outputs (matched objects in red, faces in blue) with their scores."""
    thumbs = out / "thumbs"
    thumbs.mkdir(exist_ok=True)
    rows = []
    for ci, r in enumerate(results):
        cells = []
        for k, p in enumerate(r.case.references):
            name = f"c{ci:05d}_ref{k}.jpg"
            _thumb(p).save(thumbs / name, quality=85)
            cells.append(
                f'<figure class="ref"><img src="thumbs/{name}"><figcaption>ref {k + 1}</figcaption></figure>'
            )
        for j, img in enumerate(r.images):
            name = f"c{ci:05d}_gen{j}.jpg"
            _thumb(img.image, _image_boxes(img)).save(thumbs / name, quality=85)
            seed = "" if img.seed is None else f"seed {img.seed}: "
            cells.append(
                f'<figure><img src="thumbs/{name}"><figcaption>{html.escape(seed + _image_caption(img))}'
                "</figcaption></figure>"
            )
        d = r.to_dict()
        summary = " ".join(f"{m}={d[m]:.3f}" for m in METRICS if d[m] is not None)
        rows.append(
            f"<section><h3>{html.escape(r.case.id)}</h3><p class=prompt>{html.escape(r.case.prompt)}</p>"
            f"<p>{html.escape(summary)}</p><div class=row>{''.join(cells)}</div></section>"
        )
    agg_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in agg.items()
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>MUMU evaluation</title><style>
body{{font-family:sans-serif;background:#111;color:#ddd;margin:1em}} table{{border-collapse:collapse}}
td{{border:1px solid #444;padding:2px 8px}} .row{{display:flex;flex-wrap:wrap;gap:6px}}
figure{{margin:0;width:{THUMB}px}} figcaption{{font-size:11px}} .ref img{{outline:2px solid #4a4}}
.prompt{{font-style:italic}}</style></head><body><h1>MUMU evaluation</h1>
<h2>Aggregate (mean over generated images)</h2><table>{agg_rows}</table>
<p>References have a green frame; red boxes are matched objects, blue boxes matched faces.</p>{"".join(rows)}</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path


def write_grid(results: Sequence[CaseScores], path: Path, max_rows: int = GRID_MAX_ROWS) -> Path:
    """One row per case (first ``max_rows``): references, then outputs, each captioned with scores."""
    shown = list(results)[:max_rows]
    cols = max([len(r.case.references) + len(r.images) for r in shown] + [1])
    line = 12
    cap = line * (len(METRICS) + 2)
    header = 16
    grid = Image.new("RGB", (cols * THUMB, max(1, len(shown)) * (THUMB + cap + header)), (17, 17, 17))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for row, r in enumerate(shown):
        y = row * (THUMB + cap + header)
        draw.text((4, y + 2), f"{r.case.id}: {r.case.prompt}"[: cols * 26], fill=(230, 230, 230), font=font)
        x = 0
        for p in r.case.references:
            grid.paste(_thumb(p), (x, y + header))
            draw.rectangle(
                [x, y + header, x + THUMB - 1, y + header + THUMB - 1], outline=(60, 180, 60), width=2
            )
            draw.text((x + 2, y + header + THUMB + 2), "reference", fill=(120, 220, 120), font=font)
            x += THUMB
        for img in r.images:
            grid.paste(_thumb(img.image, _image_boxes(img)), (x, y + header))
            for li, text in enumerate(_caption_parts(img)):
                draw.text((x + 2, y + header + THUMB + 2 + li * line), text, fill=(220, 220, 220), font=font)
            x += THUMB
    grid.save(path)
    return path

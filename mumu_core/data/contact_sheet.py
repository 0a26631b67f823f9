"""Contact sheet of bootstrapped samples: image with boxes, the interleaved prompt with crops inline,
head crops and control images. PNG always, HTML optionally (images embedded, one file)."""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .shards import iter_samples, write_bytes_atomic

_KEPT = (40, 200, 60)
_COLOURS = {"over_limit": (255, 160, 0), "duplicate": (160, 80, 255)}
_DROPPED = (230, 40, 40)
ROW_W = 1400


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _open(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im.convert("RGB")


def _thumb(im: Image.Image, side: int) -> Image.Image:
    im = im.copy()
    im.thumbnail((side, side))
    return im


def _boxed(image: Image.Image, rec: dict, side: int) -> Image.Image:
    im = image.copy()
    draw = ImageDraw.Draw(im)
    lw = max(2, round(max(im.size) / 200))
    font = _font(max(12, round(max(im.size) / 40)))
    for i, o in enumerate(rec["objects"]):
        if o["box"] is None:
            continue
        colour = _KEPT if o["kept"] else _COLOURS.get(o["reason"], _DROPPED)
        draw.rectangle(o["box"], outline=colour, width=lw)
        tag = f"{i}:{o['phrase']} {o['score']:.2f}" + ("" if o["kept"] else f" [{o['reason']}]")
        draw.text((o["box"][0] + lw, o["box"][1] + lw), tag, fill=colour, font=font)
        if o.get("head_box"):
            draw.rectangle(o["head_box"], outline=(0, 200, 255), width=max(1, lw // 2))
    return _thumb(im, side)


def _prompt_strip(sample: dict, rec: dict, width: int, crop_side: int = 72) -> Image.Image:
    """Flow the prompt's words and crop thumbnails left to right, wrapping at ``width``."""
    font = _font(18)
    items: list[str | Image.Image] = []
    for seg in rec["prompt"]:
        if "text" in seg:
            items.extend(w + " " for w in seg["text"].split())
        else:
            items.append(_thumb(_open(sample[seg["image"]]), crop_side))
    canvas = Image.new("RGB", (width, 4 * (crop_side + 8)), "white")
    draw = ImageDraw.Draw(canvas)
    x = y = 4
    line_h = crop_side + 8
    for it in items:
        w = it.width + 6 if isinstance(it, Image.Image) else int(draw.textlength(it, font=font))
        if x + w > width - 4:
            x, y = 4, y + line_h
        if y + line_h > canvas.height:
            grown = Image.new("RGB", (width, canvas.height + line_h * 2), "white")
            grown.paste(canvas)
            canvas, draw = grown, ImageDraw.Draw(grown)
        if isinstance(it, Image.Image):
            top = y + (crop_side - it.height) // 2
            canvas.paste(it, (x, top))
            draw.rectangle((x - 1, top - 1, x + it.width, top + it.height), outline=_KEPT)
        else:
            draw.text((x, y + crop_side // 2 - 10), it, fill="black", font=font)
        x += w
    return canvas.crop((0, 0, width, y + line_h))


def render_row(sample: dict, side: int = 320) -> Image.Image:
    rec = json.loads(sample["json"])
    image = _open(sample["jpg"])
    left = _boxed(image, rec, side)
    right_w = ROW_W - side - 12
    strip = _prompt_strip(sample, rec, right_w)
    small = [_thumb(_open(sample[o["head_crop"]]), 64) for o in rec["objects"] if o.get("head_crop")]
    small += [_thumb(_open(sample[v]), 96) for v in rec["controls"].values()]
    info = f"{rec['key']}  {rec['width']}x{rec['height']}  caption: {rec['caption']}"
    h = max(left.height, 24 + strip.height + 104) + 8
    row = Image.new("RGB", (ROW_W, h), "white")
    row.paste(left, (4, 4))
    d = ImageDraw.Draw(row)
    d.text((side + 12, 4), info[:150], fill=(80, 80, 80), font=_font(14))
    row.paste(strip, (side + 8, 24))
    x = side + 12
    for im in small:
        row.paste(im, (x, 28 + strip.height))
        x += im.width + 6
    d.line((0, h - 1, ROW_W, h - 1), fill=(200, 200, 200))
    return row


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _html_row(sample: dict, row_png: bytes) -> str:
    rec = json.loads(sample["json"])
    parts = []
    for seg in rec["prompt"]:
        if "text" in seg:
            parts.append(html_lib.escape(seg["text"]))
        else:
            parts.append(
                f'<img src="{_b64(sample[seg["image"]])}" style="height:64px;vertical-align:middle">'
            )
    objs = "".join(
        f"<li>{i}: {html_lib.escape(o['phrase'])} {o['score']:.2f} "
        f"{'kept' if o['kept'] else html_lib.escape(str(o['reason']))} box={o['box']}</li>"
        for i, o in enumerate(rec["objects"])
    )
    return (
        f"<section><h3>{html_lib.escape(rec['key'])}</h3><p>{''.join(parts)}</p>"
        f'<img src="{_b64(row_png)}" style="max-width:100%"><ul>{objs}</ul></section>'
    )


def contact_sheet(
    shard_dir: str | os.PathLike,
    out_png: str | os.PathLike,
    n: int = 8,
    html: str | os.PathLike | None = None,
) -> Path:
    """Render the first ``n`` samples of the shards in ``shard_dir`` to ``out_png`` (and ``html``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rows, htmls = [], []
    for sample in iter_samples(shard_dir):
        row = render_row(sample)
        rows.append(row)
        if html is not None:
            buf = io.BytesIO()
            row.save(buf, format="PNG")
            htmls.append(_html_row(sample, buf.getvalue()))
        if len(rows) == n:
            break
    if not rows:
        raise FileNotFoundError(
            f"no samples in shard-*.tar under {shard_dir}: run `python -m mumu_core.data bootstrap` first"
        )
    sheet = Image.new("RGB", (ROW_W, sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    write_bytes_atomic(out_png, buf.getvalue())
    if html is not None:
        doc = "<!doctype html><meta charset=utf-8><title>MUMU bootstrap</title><body>" + "".join(htmls)
        write_bytes_atomic(html, doc.encode("utf-8"))
    return Path(out_png)

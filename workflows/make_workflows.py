"""Writes the bundled ComfyUI workflows (UI format, drag-and-drop), their thumbnails and example inputs.

    python workflows/make_workflows.py          # rewrites example_workflows/

Outputs, in example_workflows/ (ComfyUI's templates browser lists <pack>/example_workflows/*.json):

- ``<name>.json``: the frontend's workflow format (version 0.4: nodes with id/type/pos/size/inputs/
  outputs/widgets_values, links as [id, from, from_slot, to, to_slot, type]);
- ``<name>.jpg``: a thumbnail drawn from the workflow itself (prompt, reference slots, pipeline);
- ``example_workflows/input/*.png``: the reference images the LoadImage nodes name. They are simple
  drawings made here, stand-ins to show the wiring; replace them with your own photos.

Widget order follows each node's inputs in ComfyUI's input_order (required, then optional), as the
frontend saves them; tests/nodes/test_nodes_workflows.py runs every file in a real ComfyUI.
"""

from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
# Only example_workflows/: ComfyUI lists every *.json in a pack's workflows/ folder too, so copies
# there would show each template twice.
OUT_DIRS = (ROOT / "example_workflows",)
INPUT_DIR = ROOT / "example_workflows" / "input"

SDXL_CKPT = "sd_xl_base_1.0.safetensors"
FINETUNE_CKPT = "animagine-xl-3.1.safetensors"
VLM = "idefics2-8b"
BUNDLE = "mumu-sdxl.safetensors"
DETECTOR = "grounding-dino-base"  # models/grounding-dino/<this>/ (IDEA-Research/grounding-dino-base)
SAM = "sam-vit-base"  # models/sams/<this>/ (facebook/sam-vit-base, transformers format)
MINI_DEMO_DIR = ROOT / "mumu_core" / "mini" / "demo"
# (example input name, shipped mini demo reference): held-out renders of the mini world.
MINI_INPUTS = {
    "mumu_mini_red_circle.png": "red_circle_ref1.png",
    "mumu_mini_blue_square.png": "blue_square_ref1.png",
}
MAX_IMAGES = 4  # nodes/prompt_spec.MAX_IMAGES (not imported: this script must run without torch)

# Socket inputs (name, type) and outputs (name, type) of the nodes used; widgets are separate.
SOCKETS: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")]),
    "KSampler": (
        [
            ("model", "MODEL"),
            ("positive", "CONDITIONING"),
            ("negative", "CONDITIONING"),
            ("latent_image", "LATENT"),
        ],
        [("LATENT", "LATENT")],
    ),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "CheckpointSave": ([("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")], []),
    "Note": ([], []),
    "MUMULoader": ([], [("mumu_model", "MUMU_MODEL")]),
    "MUMUPromptBuilder": (
        [(f"{k}{i}", t) for i in range(1, MAX_IMAGES + 1) for k, t in (("image", "IMAGE"), ("mask", "MASK"))],
        [("mumu_prompt", "MUMU_PROMPT")],
    ),
    "MUMUEncoder": (
        [("mumu_model", "MUMU_MODEL"), ("mumu_prompt", "MUMU_PROMPT"), ("latent", "LATENT")],
        [("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
    ),
    "MUMUSegmentReference": ([("image", "IMAGE")], [("reference", "IMAGE"), ("mask", "MASK")]),
    "MUMUMiniLoader": ([], [("mini_model", "MUMU_MINI_MODEL")]),
    "MUMUMiniSampler": (
        [("mini_model", "MUMU_MINI_MODEL"), ("mumu_prompt", "MUMU_PROMPT")],
        [("images", "IMAGE")],
    ),
    "MUMULoraMerge": ([("model", "MODEL")], [("model", "MODEL")]),
    "MUMUSaveLora": ([], [("path", "STRING")]),
}
SIZES = {
    "CheckpointLoaderSimple": (320, 100),
    "LoadImage": (260, 330),
    "EmptyLatentImage": (280, 110),
    "KSampler": (300, 270),
    "VAEDecode": (200, 50),
    "SaveImage": (320, 340),
    "CheckpointSave": (320, 100),
    "Note": (420, 220),
    "MUMULoader": (340, 130),
    "MUMUPromptBuilder": (420, 520),
    "MUMUEncoder": (300, 230),
    "MUMULoraMerge": (320, 90),
    "MUMUSaveLora": (320, 90),
    "MUMUSegmentReference": (320, 200),
    "MUMUMiniLoader": (340, 90),
    "MUMUMiniSampler": (300, 200),
}


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: list
    title: str | None = None
    links_in: dict[str, int] = field(default_factory=dict)
    links_out: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class Workflow:
    name: str
    title: str
    description: str
    nodes: list[Node] = field(default_factory=list)
    links: list[list] = field(default_factory=list)
    refs: list[tuple[str, str]] = field(default_factory=list)  # (image file, tokens) for the thumbnail
    prompt: str = ""

    def add(self, type_: str, pos: tuple[int, int], widgets: list, title: str | None = None) -> Node:
        node = Node(len(self.nodes) + 1, type_, pos, widgets, title)
        self.nodes.append(node)
        return node

    def link(self, src: Node, out_name: str, dst: Node, in_name: str) -> None:
        outs = SOCKETS[src.type][1]
        slot = [n for n, _ in outs].index(out_name)
        ins = SOCKETS[dst.type][0]
        dslot = [n for n, _ in ins].index(in_name)
        lid = len(self.links) + 1
        self.links.append([lid, src.id, slot, dst.id, dslot, outs[slot][1]])
        dst.links_in[in_name] = lid
        src.links_out.setdefault(slot, []).append(lid)

    def to_ui(self) -> dict:
        nodes = []
        for order, n in enumerate(self.nodes):
            ins, outs = SOCKETS[n.type]
            d = {
                "id": n.id,
                "type": n.type,
                "pos": list(n.pos),
                "size": list(SIZES[n.type]),
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": [{"name": name, "type": t, "link": n.links_in.get(name)} for name, t in ins],
                "outputs": [
                    {"name": name, "type": t, "slot_index": i, "links": n.links_out.get(i, [])}
                    for i, (name, t) in enumerate(outs)
                ],
                "properties": {"Node name for S&R": n.type},
                "widgets_values": n.widgets,
            }
            if n.title:
                d["title"] = n.title
            nodes.append(d)
        return {
            "id": f"mumu-{self.name}",
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {
                "ds": {"scale": 0.8, "offset": [0, 0]},
                "mumu": {"title": self.title, "prompt": self.prompt},
            },
            "version": 0.4,
        }


def prompt_widgets(text: str, tokens: list[str], weights: list[float]) -> list:
    """[text, tokens1, weight1, ..., tokens4, weight4]: the builder's widgets in input order."""
    tokens = tokens + ["default"] * (MAX_IMAGES - len(tokens))
    weights = weights + [1.0] * (MAX_IMAGES - len(weights))
    out: list = [text]
    for t, w in zip(tokens, weights):
        out += [t, w]
    return out


def note(wf: Workflow, pos: tuple[int, int], extra: str = "") -> None:
    text = (
        f"{wf.title}\n\n{wf.description}\n\nModels (see docs/COMFYUI.md):\n"
        f"- models/LLM/{VLM}/ : the Idefics2 base (Hugging Face folder)\n"
        f"- models/mumu/{BUNDLE} : the MUMU bundle\n"
        f"- models/checkpoints/{SDXL_CKPT} (or any SDXL checkpoint)\n"
        "Reference images: copy example_workflows/input/*.png into ComfyUI/input/ (or load your own).\n"
        "Negative: the MUMU Encoder's zero negative (MUMU is trained with it), guidance 6, DDIM, 50 steps."
        + extra
    )
    wf.add("Note", pos, [text], title="About this workflow")


def generation(
    wf: Workflow,
    text: str,
    refs: list[tuple[str, str, float]],
    ckpt: str = SDXL_CKPT,
    prefix: str = "MUMU/out",
    seed: int = 42,
    segment: dict[int, str] | None = None,
) -> dict[str, Node]:
    """Checkpoint -> MUMU LoRA Merge -> KSampler <- MUMU Encoder <- Prompt Builder <- LoadImage x N.

    ``segment`` {slot index: phrase}: that reference goes through MUMU Segment Reference (image + mask)."""
    wf.prompt = text
    wf.refs = [(f, t) for f, t, _ in refs]
    ckpt_node = wf.add("CheckpointLoaderSimple", (40, 60), [ckpt])
    merge = wf.add(
        "MUMULoraMerge", (40, 200), [BUNDLE, 1.0], title="MUMU LoRA Merge (the bundle's UNet LoRA)"
    )
    wf.link(ckpt_node, "MODEL", merge, "model")
    loader = wf.add("MUMULoader", (40, 330), [VLM, BUNDLE, "auto", "offload after encoding"])
    images = []
    for i, (fname, _tokens, _w) in enumerate(refs):
        images.append(wf.add("LoadImage", (40 + 280 * i, 500), [fname, "image"], title=f"image{i + 1}"))
    builder = wf.add(
        "MUMUPromptBuilder",
        (420, 40),
        prompt_widgets(text, [t for _, t, _ in refs], [w for _, _, w in refs]),
    )
    for i, im in enumerate(images):
        phrase = (segment or {}).get(i)
        if phrase is None:
            wf.link(im, "IMAGE", builder, f"image{i + 1}")
            continue
        seg = wf.add(
            "MUMUSegmentReference",
            (40 + 280 * i, 860),
            [phrase, DETECTOR, SAM, 0.3, 0.05],
            title=f"segment image{i + 1}: {phrase}",
        )
        wf.link(im, "IMAGE", seg, "image")
        wf.link(seg, "reference", builder, f"image{i + 1}")
        wf.link(seg, "mask", builder, f"mask{i + 1}")
    encoder = wf.add("MUMUEncoder", (880, 40), [1024, 1024, 0, 0, 1024, 1024])
    wf.link(loader, "mumu_model", encoder, "mumu_model")
    wf.link(builder, "mumu_prompt", encoder, "mumu_prompt")
    latent = wf.add("EmptyLatentImage", (880, 300), [1024, 1024, 1])
    wf.link(latent, "LATENT", encoder, "latent")
    sampler = wf.add("KSampler", (1220, 40), [seed, "fixed", 50, 6.0, "ddim", "ddim_uniform", 1.0])
    wf.link(merge, "model", sampler, "model")
    wf.link(encoder, "positive", sampler, "positive")
    wf.link(encoder, "negative", sampler, "negative")
    wf.link(latent, "LATENT", sampler, "latent_image")
    decode = wf.add("VAEDecode", (1560, 40), [])
    wf.link(sampler, "LATENT", decode, "samples")
    wf.link(ckpt_node, "VAE", decode, "vae")
    save = wf.add("SaveImage", (1560, 140), [prefix])
    wf.link(decode, "IMAGE", save, "images")
    return {"ckpt": ckpt_node, "merge": merge, "loader": loader, "builder": builder, "sampler": sampler}


def paper_example() -> Workflow:
    wf = Workflow(
        "mumu_man_dog_animated",
        "MUMU: a <image1> man and his <image2> dog in an <image3> animated style",
        "The paper's example: two subjects and a style reference in one interleaved prompt.",
    )
    generation(
        wf,
        "a <image1> man and his <image2> dog in an <image3> animated style",
        [
            ("mumu_man.png", "default", 1.0),
            ("mumu_dog.png", "default", 1.0),
            ("mumu_style.png", "default", 1.0),
        ],
        prefix="MUMU/man_and_dog",
    )
    note(wf, (1220, 380))
    return wf


def style_transfer() -> Workflow:
    wf = Workflow(
        "mumu_style_transfer",
        "MUMU: style transfer from a style reference",
        "One style image; the text says what to draw. Lower the weight to loosen the style.",
    )
    generation(
        wf,
        "a lighthouse on a rocky coast at sunset in a <image> style",
        [("mumu_style.png", "default", 1.0)],
        prefix="MUMU/style_transfer",
    )
    note(wf, (1220, 380))
    return wf


def character() -> Workflow:
    wf = Workflow(
        "mumu_character_consistency",
        "MUMU: character consistency from one reference (1296 tokens)",
        "One person reference at 1296 tokens (504 px, 36x36 patches) keeps face detail; the text places "
        "the same character in a new scene. MUMU Segment Reference cuts the person out first (GroundingDINO "
        "finds 'person', SAM masks it), as the paper segments its references: a background left in gets copied.",
    )
    generation(
        wf,
        "a photo of <image> as an astronaut on the moon, smiling",
        [("mumu_face.png", "1296", 1.0)],
        prefix="MUMU/character",
        segment={0: "person"},
    )
    note(
        wf,
        (1220, 380),
        f"\n- models/grounding-dino/{DETECTOR}/ : GroundingDINO (Hugging Face folder)"
        f"\n- models/sams/{SAM}/ : SAM in transformers format (facebook/sam-vit-base)",
    )
    return wf


def mini() -> Workflow:
    wf = Workflow(
        "mumu_mini_no_downloads",
        "MUMU-mini: runs out of the box (embedded model, CPU, seconds)",
        "The pack's embedded MUMU-mini model (24 px, a world of coloured shapes; docs/MINI.md) with no "
        "downloads. The caption never names a colour or shape: they come from the reference. Swap the "
        "LoadImage picture (any shape crop, e.g. the other mumu_mini_*.png) and the output follows it.",
    )
    text = "a <image>shape on a background"
    wf.prompt = text
    wf.refs = [("mumu_mini_red_circle.png", "default")]
    loader = wf.add("MUMUMiniLoader", (40, 60), ["embedded MUMU-mini", True])
    image = wf.add("LoadImage", (40, 200), ["mumu_mini_red_circle.png", "image"], title="image1 (swap me)")
    builder = wf.add("MUMUPromptBuilder", (340, 40), prompt_widgets(text, ["default"], [1.0]))
    wf.link(image, "IMAGE", builder, "image1")
    sampler = wf.add("MUMUMiniSampler", (800, 40), [0, "fixed", 20, 1.5, 4, 8])
    wf.link(loader, "mini_model", sampler, "mini_model")
    wf.link(builder, "mumu_prompt", sampler, "mumu_prompt")
    save = wf.add("SaveImage", (1140, 40), ["MUMU/mini"])
    wf.link(sampler, "images", save, "images")
    wf.add(
        "Note",
        (800, 300),
        [
            f"{wf.title}\n\n{wf.description}\n\nNo model files to install: the weights ship inside the pack "
            "(mumu_core/mini/weights/model/). Copy example_workflows/input/*.png into ComfyUI/input/. "
            "This is the mini path: the MUMU-mini Sampler runs the 24 px pixel-space UNet itself, since "
            "ComfyUI's KSampler only runs SDXL-family UNet layouts. For SDXL use the other MUMU workflows."
        ],
        title="About this workflow",
    )
    return wf


def lora_merge() -> Workflow:
    wf = Workflow(
        "mumu_lora_merge_finetune",
        "MUMU: UNet LoRA merged into a community SDXL fine-tune, saved as a checkpoint",
        "The bundle's UNet LoRA applied to a community SDXL fine-tune by ComfyUI's own LoRA patching; "
        "Save Checkpoint writes the merged model to output/checkpoints/, MUMU Save UNet LoRA writes the "
        "kohya LoRA to models/loras/, and the KSampler checks the merged model with a MUMU prompt.",
    )
    nodes = generation(
        wf,
        "a <image1> dog in an <image2> animated style",
        [("mumu_dog.png", "default", 1.0), ("mumu_style.png", "default", 1.0)],
        ckpt=FINETUNE_CKPT,
        prefix="MUMU/finetune",
    )
    save_ckpt = wf.add("CheckpointSave", (40, 860), ["checkpoints/animagine_mumu"])
    wf.link(nodes["merge"], "model", save_ckpt, "model")
    wf.link(nodes["ckpt"], "CLIP", save_ckpt, "clip")
    wf.link(nodes["ckpt"], "VAE", save_ckpt, "vae")
    wf.add("MUMUSaveLora", (420, 860), [BUNDLE, "mumu/mumu_unet_lora"])
    note(wf, (1220, 380), f"\n- models/checkpoints/{FINETUNE_CKPT}: the fine-tune to merge into")
    return wf


WORKFLOWS = (mini, paper_example, style_transfer, character, lora_merge)


# -- pictures ------------------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def draw_inputs() -> dict[str, Image.Image]:
    """Simple flat drawings standing in for real reference photos."""
    s = 256
    out = {}

    man = Image.new("RGB", (s, s), (214, 228, 240))
    d = ImageDraw.Draw(man)
    d.rectangle([78, 130, 178, 256], fill=(40, 70, 140))  # jacket
    d.polygon([(112, 130), (128, 170), (144, 130)], fill=(240, 240, 240))  # shirt
    d.ellipse([88, 40, 168, 130], fill=(232, 190, 160))  # head
    d.pieslice([84, 30, 172, 110], 180, 360, fill=(70, 45, 30))  # hair
    d.ellipse([108, 78, 116, 86], fill=(30, 30, 30))
    d.ellipse([140, 78, 148, 86], fill=(30, 30, 30))
    d.arc([112, 92, 144, 116], 20, 160, fill=(120, 50, 40), width=3)
    out["mumu_man.png"] = man

    dog = Image.new("RGB", (s, s), (200, 230, 190))
    d = ImageDraw.Draw(dog)
    d.ellipse([60, 120, 200, 200], fill=(190, 130, 70))  # body
    for x in (72, 100, 160, 184):
        d.rectangle([x, 180, x + 14, 236], fill=(170, 110, 55))  # legs
    d.ellipse([150, 70, 230, 150], fill=(200, 140, 80))  # head
    d.ellipse([140, 70, 170, 130], fill=(120, 70, 35))  # ear
    d.ellipse([200, 100, 210, 110], fill=(20, 20, 20))
    d.ellipse([222, 118, 234, 128], fill=(20, 20, 20))  # nose
    d.line([(60, 150), (28, 110)], fill=(170, 110, 55), width=10)  # tail
    out["mumu_dog.png"] = dog

    style = Image.new("RGB", (s, s), (255, 240, 200))
    d = ImageDraw.Draw(style)
    d.rectangle([0, 0, s, 120], fill=(120, 200, 255))  # sky
    d.ellipse([170, 20, 230, 80], fill=(255, 220, 60), outline=(30, 30, 30), width=4)  # sun
    d.polygon([(0, 170), (80, 90), (160, 170)], fill=(110, 190, 120), outline=(30, 30, 30))
    d.polygon([(90, 170), (180, 70), (256, 170)], fill=(80, 160, 110), outline=(30, 30, 30))
    d.rectangle([0, 170, s, s], fill=(250, 150, 90), outline=(30, 30, 30), width=4)  # cel-shaded ground
    for i in range(6):
        d.arc([20 + 36 * i, 190, 60 + 36 * i, 230], 180, 360, fill=(30, 30, 30), width=3)
    out["mumu_style.png"] = style

    face = Image.new("RGB", (s, s), (60, 60, 70))
    d = ImageDraw.Draw(face)
    d.rectangle([70, 200, 186, 256], fill=(150, 40, 50))  # shoulders
    d.ellipse([68, 36, 188, 196], fill=(198, 150, 120))  # face
    d.chord([60, 20, 196, 130], 180, 360, fill=(20, 20, 25))  # hair
    for x in (98, 142):
        d.ellipse([x, 100, x + 18, 112], fill=(255, 255, 255))
        d.ellipse([x + 5, 101, x + 13, 111], fill=(60, 40, 30))
    d.line([(128, 112), (122, 140), (132, 142)], fill=(150, 100, 80), width=3)
    d.arc([104, 140, 152, 172], 20, 160, fill=(140, 50, 50), width=4)
    out["mumu_face.png"] = face
    for name, src in MINI_INPUTS.items():
        with Image.open(MINI_DEMO_DIR / src) as im:
            out[name] = im.convert("RGB")
    return out


def thumbnail(wf: Workflow, inputs: dict[str, Image.Image]) -> Image.Image:
    """The prompt with its reference slots, and the node chain, drawn honestly from the workflow."""
    w, h = 640, 400
    im = Image.new("RGB", (w, h), (30, 32, 38))
    d = ImageDraw.Draw(im)
    d.text((20, 16), "ComfyUI-MUMU", font=_font(16), fill=(150, 160, 180))
    for i, line in enumerate(textwrap.wrap(wf.title.replace("MUMU: ", ""), 48)[:2]):
        d.text((20, 40 + 28 * i), line, font=_font(22), fill=(235, 235, 240))
    n = max(1, len(wf.refs))
    side = min(150, (w - 40 - 20 * (n - 1)) // n)
    colors = [(230, 120, 80), (90, 170, 230), (140, 210, 120), (220, 190, 80)]
    y0 = 120
    for i, (fname, tokens) in enumerate(wf.refs):
        x = 20 + i * (side + 20)
        small = max(inputs[fname].size) < 64  # mini-world crops: keep their pixels sharp
        resample = Image.Resampling.NEAREST if small else Image.Resampling.BICUBIC
        ref = inputs[fname].resize((side, side), resample)
        im.paste(ref, (x, y0))
        d.rectangle([x - 3, y0 - 3, x + side + 2, y0 + side + 2], outline=colors[i % 4], width=3)
        d.text((x, y0 + side + 6), f"<image{i + 1}>", font=_font(13), fill=colors[i % 4])
        label = "default tokens" if tokens == "default" else f"{tokens} tokens"
        d.text((x, y0 + side + 22), label, font=_font(12), fill=colors[i % 4])
    y = y0 + side + 48
    prompt = wf.prompt
    for line in textwrap.wrap(f'"{prompt}"', 58)[:3]:
        d.text((20, y), line, font=_font(17), fill=(245, 245, 210))
        y += 24
    chain = "LoadImage -> Prompt Builder -> MUMU Encoder -> KSampler (SDXL + MUMU LoRA)"
    if any(n.type == "MUMUSegmentReference" for n in wf.nodes):
        chain = "LoadImage -> Segment Reference -> Prompt Builder -> MUMU Encoder -> KSampler"
    if any(n.type == "MUMUMiniSampler" for n in wf.nodes):
        chain = "embedded MUMU-mini Loader + LoadImage -> Prompt Builder -> MUMU-mini Sampler (CPU, seconds)"
    if any(n.type == "CheckpointSave" for n in wf.nodes):
        chain = "SDXL fine-tune -> MUMU LoRA Merge -> Save Checkpoint / KSampler"
    d.text((20, h - 30), chain, font=_font(13), fill=(150, 160, 180))
    return im


def render() -> dict[str, str]:
    """{file name: JSON text} of every workflow (the test compares it with the committed files)."""
    return {
        f"{wf.name}.json": json.dumps(wf.to_ui(), indent=1) + "\n" for wf in (make() for make in WORKFLOWS)
    }


def main() -> int:
    INPUT_DIR.mkdir(parents=True, exist_ok=True)
    inputs = draw_inputs()
    for name, picture in inputs.items():
        picture.save(INPUT_DIR / name, optimize=True)
    for out in OUT_DIRS:
        out.mkdir(exist_ok=True)
    for make in WORKFLOWS:
        wf = make()
        text = json.dumps(wf.to_ui(), indent=1) + "\n"
        thumb = thumbnail(wf, inputs)
        for out in OUT_DIRS:
            (out / f"{wf.name}.json").write_text(text)
            thumb.save(out / f"{wf.name}.jpg", quality=88)
        print(f"wrote {wf.name}.json/.jpg in {', '.join(str(o.relative_to(ROOT)) for o in OUT_DIRS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

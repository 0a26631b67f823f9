"""Training benchmark: tiny-preset step time single process vs 2-process FSDP2 (CPU, gloo), and the
model FLOPs of one training step at real sizes (meta device, FlopCounterMode) for MFU on a GPU.

    python bench/bench_train.py [--steps 8] [--skip-flops] [--skip-runs]

Writes bench/results/train.json. Step times are medians over the steps after the first two (warm-up:
lazy init, allocator). On a shared 2-core CPU the 2-process ratio shows FSDP's overhead (all-gathers
and reduce-scatters over gloo) more than any speed-up; on GPUs the same command family scales out.
MFU = flops_per_sample * samples_per_s / peak_flops (e.g. ~989e12 dense bf16 on an H100 SXM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "train"))

RESULTS = ROOT / "bench" / "results" / "train.json"


def run_tiny(models, shards: list[str], out: Path, procs: int, steps: int, batch: int, threads: int) -> dict:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
        if procs > 1
        else [sys.executable]
    )
    cmd = [
        *launcher, "-m", "train", "--config", str(ROOT / "train/configs/tiny.yaml"), "--set",
        f"model.vlm={models.vlm}", f"model.sdxl={models.sdxl}", f"data.shards={','.join(shards)}",
        f"out_dir={out}", f"optim.max_steps={steps}", f"optim.batch_size={batch}", "checkpoint.every=100000",
        "checkpoint.resume=false", "logging.tensorboard=false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"benchmark run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows[2:]] or [r["step_time_s"] for r in rows]
    step = statistics.median(times)
    return {
        "processes": procs,
        "threads_per_process": threads,
        "batch_per_process": batch,
        "steps": steps,
        "median_step_s": step,
        "samples_per_s": batch * procs / step,
        "wall_s_including_startup": wall,
    }


def show(name: str, r: dict) -> None:
    print(f"{name}: {r['median_step_s']:.3f} s/step, {r['samples_per_s']:.2f} samples/s")


def real_flops(batch: int = 1, images: int = 3, text_tokens: int = 32) -> dict:
    """FLOPs of one training step (forward + backward) at real sizes, counted on the meta device.

    Stage-1 shapes: ``images`` crops of 324 tokens (252 px) plus text, SDXL at 1024 px (128x128
    latents). Trainable as in stage 1 (connector full, LoRA 8 on the LLM and UNet, ViT frozen): the
    backward pass then computes activation gradients through the frozen weights, as it does for real.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Idefics2Config, Idefics2Model

    from mumu_core.bundle import UNET_LORA_TARGETS
    from mumu_core.connector import MumuConnector
    from mumu_core.encoder import VLM_LORA_TARGETS, remove_perceiver
    from mumu_core.presets import REAL

    # idefics2-8b's published config (SigLIP-so400m vision tower + Mistral-7B), written out: no hub.
    vlm_cfg = Idefics2Config(
        vision_config={
            "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
            "num_attention_heads": 16, "image_size": 980, "patch_size": 14,
        },
        perceiver_config={"hidden_size": 4096, "resampler_n_latents": 64, "resampler_depth": 3,
                          "resampler_n_heads": 16, "resampler_head_dim": 96, "num_key_value_heads": 4},
        text_config={
            "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32003,
            "max_position_embeddings": 32768,
        },
    )  # fmt: skip
    tokens = images * 324 + text_tokens
    with torch.device("meta"):
        vlm = Idefics2Model(vlm_cfg)
        remove_perceiver(vlm)
        inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=VLM_LORA_TARGETS), vlm)
        connector = MumuConnector(REAL.connector)
        unet = UNet2DConditionModel(**REAL.unet)
        inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=UNET_LORA_TARGETS), unet)
        for m in (vlm, unet):
            for n, p in m.named_parameters():
                p.requires_grad_("lora_" in n)
        px = torch.empty(batch * images, 3, 252, 252)
        text = torch.empty(batch, text_tokens, 4096)
        latents = torch.empty(batch, 4, 128, 128)
        t = torch.zeros(batch, dtype=torch.long)
        time_ids = torch.empty(batch, 6)

    counts = {}
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():  # frozen ViT: no backward
            # The vision tower's own forward builds its patch mask with .item(), which the meta device
            # cannot do; the same modules are called directly (every image is full: no mask needed).
            vm = vlm.vision_model
            emb = vm.embeddings.patch_embedding(px).flatten(2).transpose(1, 2)
            feats = vm.post_layernorm(vm.encoder(inputs_embeds=emb).last_hidden_state)
    counts["vision_forward"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        h = vlm.connector.modality_projection(feats).reshape(batch, images * 324, 4096)
        embeds = torch.cat([h, text], dim=1)
        # transformers' mask builders read tensor values (.item()), which the meta device cannot; the
        # decoder layers are called directly with no padding mask (one unpadded prompt per sample).
        tm = vlm.text_model
        pos = torch.arange(tokens, device="meta")[None].expand(batch, -1)
        rope = tm.rotary_emb(embeds, pos)
        hidden = embeds
        for layer in tm.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=rope)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        hidden = tm.norm(hidden)
        # MumuConnector.forward checks its mask's values (impossible on meta): the same modules in order.
        x = connector.proj_in(hidden)
        bias = torch.zeros(batch, 1, 1, tokens, device="meta")
        for block in connector.blocks:
            x = block(x, bias)
        x = connector.norm_out(x)
        context = connector.proj_context(x)
        q = connector.pool_query.expand(batch, -1, -1)
        pooled = connector.proj_pooled(connector.pool_attn(q, x, x, need_weights=False)[0][:, 0])
        out = unet(
            latents, t, encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample  # fmt: skip
        out.float().pow(2).mean().backward()
    counts["llm_connector_unet_forward_backward"] = fc.get_total_flops()
    total = sum(counts.values())
    return {
        "batch": batch,
        "images_per_prompt": images,
        "sequence_tokens": tokens,
        "resolution": 1024,
        "flops_per_step": total,
        "flops_per_sample": total / batch,
        "breakdown": counts,
        "note": "forward+backward of one micro-batch; activation checkpointing adds ~one more forward "
        "of the checkpointed blocks (not counted: MFU counts model FLOPs)",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--skip-flops", action="store_true")
    ap.add_argument("--skip-runs", action="store_true")
    args = ap.parse_args()

    result: dict = {"preset": "tiny", "device": "cpu (gloo)", "cpu_count": os.cpu_count()}
    if not args.skip_runs:
        from train_shards import write_shards

        from mumu_core.testing import build_tiny_models

        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            models = build_tiny_models(tmp / "models")
            shards = write_shards(tmp / "shards", n_shards=2, per_shard=8)
            # Same cores either way: one process with 2 threads (and with 1), two processes with 1 each.
            single = run_tiny(models, shards, tmp / "one", 1, args.steps, args.batch, threads=2)
            show("single process, 2 threads", single)
            single1 = run_tiny(models, shards, tmp / "one1", 1, args.steps, args.batch, threads=1)
            show("single process, 1 thread", single1)
            fsdp = run_tiny(models, shards, tmp / "two", 2, args.steps, args.batch, threads=1)
            show("2-process FSDP, 1 thread each", fsdp)
        best = max(single["samples_per_s"], single1["samples_per_s"])
        ratio = fsdp["samples_per_s"] / best
        print(f"ratio samples/s, 2-process FSDP / best single process: {ratio:.2f}x")
        result.update(
            single_process_2_threads=single,
            single_process_1_thread=single1,
            fsdp_2_process=fsdp,
            samples_per_s_ratio_2proc_vs_best_single=ratio,
        )
    if not args.skip_flops:
        t0 = time.perf_counter()
        flops = real_flops()
        flops["count_time_s"] = time.perf_counter() - t0
        print(f"real-size training step: {flops['flops_per_sample'] / 1e12:.1f} TFLOP per sample")
        print(f"  breakdown: { {k: f'{v / 1e12:.1f}T' for k, v in flops['breakdown'].items()} }")
        print(
            f"  MFU on an H100 (989 TFLOP/s bf16 dense) = samples/s x {flops['flops_per_sample'] / 989e12:.4f}"
        )
        result["real_flops"] = flops
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

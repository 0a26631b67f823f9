"""Run with a real ComfyUI's python: load the pack through ComfyUI's own loader, then run define_schema()
and execute() of every MUMU node on tiny models, printing a JSON report on the last stdout line.

usage: python comfy_node_check.py COMFYUI_DIR PACK_DIR MODELS_DIR VEGA_CKPT WORK_DIR

MODELS_DIR comes from tests/nodes/nodes_models.py and is registered through a generated
extra_model_paths.yaml, as a user's would be. tests/nodes/test_nodes_in_comfyui.py asserts on the report.
Nothing here stubs ComfyUI: every call goes to the checkout at COMFYUI_DIR.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback

from comfy_boot import boot_comfyui


def main() -> None:
    comfy_dir, pack_dir, models_dir, vega_ckpt, work = (os.path.abspath(p) for p in sys.argv[1:6])
    logs = boot_comfyui(comfy_dir, models_dir, work)

    import folder_paths

    import nodes as comfy_nodes

    report: dict = {"checks": {}, "errors": []}

    # A ComfyUI without the V3 API: importing comfy_api.latest fails (a None entry in sys.modules makes
    # the import raise ImportError); the pack must fail to load with a message saying what to do.
    saved_api = sys.modules["comfy_api.latest"]
    sys.modules["comfy_api.latest"] = None
    n_logs = len(logs)
    old_ok = asyncio.run(comfy_nodes.load_custom_node(pack_dir))
    sys.modules["comfy_api.latest"] = saved_api
    sys.modules.pop(pack_dir.replace(".", "_x_"), None)
    report["old_comfy"] = {"loaded": bool(old_ok), "messages": [m for m in logs[n_logs:] if "V3" in m]}

    t0 = time.time()
    ok = asyncio.run(comfy_nodes.load_custom_node(pack_dir))
    report["loaded"] = bool(ok)
    report["load_s"] = round(time.time() - t0, 2)
    ours = {
        k: v
        for k, v in comfy_nodes.NODE_CLASS_MAPPINGS.items()
        if getattr(v, "RELATIVE_PYTHON_MODULE", "").endswith(os.path.basename(pack_dir.rstrip("/")))
    }
    report["nodes"] = sorted(ours)

    report["seconds"] = {}

    def check(name: str, fn) -> None:
        t = time.time()
        try:
            report["checks"][name] = fn()
        except Exception as e:
            report["errors"].append(
                {"check": name, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
            )
        report["seconds"][name] = round(time.time() - t, 1)

    def run(node_id: str, **kwargs):
        cls = comfy_nodes.NODE_CLASS_MAPPINGS[node_id]
        clone = cls.PREPARE_CLASS_CLONE({})
        return clone.EXECUTE_NORMALIZED(**kwargs)

    def schemas():
        out = {}
        for node_id, cls in ours.items():
            schema = cls.define_schema()
            info = cls.GET_NODE_INFO_V1()  # what /object_info serves the frontend
            out[node_id] = {
                "display_name": schema.display_name,
                "category": schema.category,
                "inputs": [i.id for i in schema.inputs],
                "input_types": {i.id: str(i.get_io_type()) for i in schema.inputs},
                "outputs": [o.get_io_type() for o in schema.outputs],
                "output_node": schema.is_output_node,
                "required": sorted(info["input"].get("required", {})),
            }
        loader_info = ours["MUMULoader"].GET_NODE_INFO_V1()["input"]["required"]
        out["_choices"] = {k: loader_info[k][1]["options"] for k in ("vlm", "bundle")}
        return out

    check("schemas", schemas)

    import execution

    def queue_errors(vlm: str, bundle: str) -> dict:
        """ComfyUI's own queue-time validation of a Loader node: {input name: error details}."""
        prompt = {
            "1": {
                "class_type": "MUMULoader",
                "inputs": {"vlm": vlm, "bundle": bundle, "dtype": "auto", "device": "offload after encoding"},
            }
        }
        valid, errors, _ = asyncio.run(execution.validate_inputs("check", prompt, "1", {}))
        return {e["extra_info"]["input_name"]: e["details"] for e in errors}

    def validation():
        cls = ours["MUMULoader"]
        return {
            "good": cls.validate_inputs(vlm="idefics2-8b"),
            "missing_vlm": cls.validate_inputs(vlm="nope-vlm"),
            "queue_good": queue_errors("idefics2-8b", "mumu-sdxl.safetensors"),
            "queue_missing_vlm": queue_errors("nope-vlm", "mumu-sdxl.safetensors"),
            "queue_missing_bundle": queue_errors("idefics2-8b", "nope.safetensors"),
        }

    check("validation", validation)

    import comfy.model_management as mm
    import torch

    state: dict = {}

    def loader():
        out = run(
            "MUMULoader",
            vlm="idefics2-8b",
            bundle="mumu-sdxl.safetensors",
            dtype="auto",
            device="offload after encoding",
        )
        model = out.args[0]
        state["model"] = model
        p = model.patcher
        return {
            "type": type(model).__name__,
            "patcher": type(p).__module__ + "." + type(p).__name__,
            "load_device": str(p.load_device),
            "offload_device": str(p.offload_device),
            "tokens_per_image": model.meta.tokens_per_image,
            "negative_pooled": model.meta.negative_pooled,
        }

    check("loader", loader)

    g = torch.Generator().manual_seed(0)
    man, dog, style = (torch.rand(1, h, w, 3, generator=g) for h, w in ((40, 30), (32, 48), (36, 36)))
    text = "a <image1> man and his <image2> dog in an <image3> animated style"

    def prompt():
        out = run(
            "MUMUPromptBuilder", text=text, image1=man, image2=dog, image3=style, tokens3="64", weight2=0.5
        )
        spec = out.args[0]
        state["spec"] = spec
        errors = {}
        for name, kwargs in {
            "too_few_images": dict(text=text, image1=man, image2=dog),
            "gap": dict(text="a <image> man", image2=man),
            "mask_lo": dict(text="a <image> man", image1=man, mask1=torch.zeros(1, 64, 64)),
            "batches": dict(
                text="<image> and <image>", image1=man.repeat(2, 1, 1, 1), image2=dog.repeat(3, 1, 1, 1)
            ),
        }.items():
            try:
                run("MUMUPromptBuilder", **kwargs)
                errors[name] = None
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {e}"
        return {"type": type(spec).__name__, "batch": spec.batch, "slots": len(spec.slots), "errors": errors}

    check("prompt", prompt)

    calls = {"n": 0}

    def encoder():
        model = state["model"]
        conditioner = model.patcher.model
        original = conditioner.encoder.forward

        def counted(*a, **k):
            calls["n"] += 1
            return original(*a, **k)

        conditioner.encoder.forward = counted
        out = run(
            "MUMUEncoder",
            mumu_model=model,
            mumu_prompt=state["spec"],
            width=64,
            height=64,
            crop_w=0,
            crop_h=0,
            target_width=64,
            target_height=64,
        )
        positive, negative = out.args
        loaded_after = any(m.model is model.patcher for m in mm.current_loaded_models)
        first_calls = calls["n"]
        out2 = run(
            "MUMUEncoder",
            mumu_model=model,
            mumu_prompt=state["spec"],
            width=64,
            height=64,
            crop_w=0,
            crop_h=0,
            target_width=64,
            target_height=64,
        )
        # The pack's own structure check, as imported by ComfyUI (module name = the pack's path).
        fmt = next(m for n, m in sys.modules.items() if n.endswith(".nodes.conditioning_format"))
        fmt.check_comfy_conditioning(positive)
        fmt.check_comfy_conditioning(negative)
        state["positive"], state["negative"] = positive, negative

        def describe(cond):
            return [
                {
                    "context": list(c.shape),
                    "dtype": str(c.dtype),
                    "device": str(c.device),
                    "keys": sorted(d),
                    "pooled": list(d["pooled_output"].shape),
                    "sizes": {k: d[k] for k in sorted(d) if k != "pooled_output"},
                    "abs_sum": float(c.abs().sum()),
                    "pooled_abs_sum": float(d["pooled_output"].abs().sum()),
                }
                for c, d in cond
            ]

        return {
            "positive": describe(positive),
            "negative": describe(negative),
            "vlm_calls_first": first_calls,
            "vlm_calls_second": calls["n"] - first_calls,
            "same_output_second": bool(torch.equal(out2.args[0][0][0], positive[0][0])),
            "patcher_loaded_after_encode": loaded_after,
            "positive_is_negative_shape": [list(positive[0][0].shape), list(negative[0][0].shape)],
        }

    check("encoder", encoder)

    sizes64 = dict(width=64, height=64, crop_w=0, crop_h=0, target_width=64, target_height=64)

    def batch_encode():
        spec = run(
            "MUMUPromptBuilder", text="a <image> man with <image>", image1=man.repeat(2, 1, 1, 1), image2=dog
        ).args[0]
        pos, neg = run(
            "MUMUEncoder",
            mumu_model=state["model"],
            mumu_prompt=spec,
            latent={"samples": torch.zeros(2, 4, 8, 8)},
            **sizes64,
        ).args
        refused = {}
        for name, latent in {"no_latent": None, "latent_1": {"samples": torch.zeros(1, 4, 8, 8)}}.items():
            try:
                run("MUMUEncoder", mumu_model=state["model"], mumu_prompt=spec, latent=latent, **sizes64)
                refused[name] = None
            except Exception as e:
                refused[name] = f"{execution.full_type_name(type(e))}: {e}"
        return {
            "positive": list(pos[0][0].shape),
            "pooled": list(pos[0][1]["pooled_output"].shape),
            "negative": list(neg[0][0].shape),
            "refused": refused,
        }

    check("batch_encode", batch_encode)

    import comfy.sd
    import comfy.utils

    def vega():
        t = time.time()
        model = comfy.sd.load_checkpoint_guess_config(vega_ckpt, output_vae=False, output_clip=False)[0]
        state["vega"] = model
        return {"class": type(model.model).__name__, "load_s": round(time.time() - t, 1)}

    check("vega", vega)

    def sample():
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        t = time.time()
        out = comfy_nodes.common_ksampler(
            state["vega"], 0, 2, 5.0, "ddim", "normal", state["positive"], state["negative"], latent
        )[0]
        s = out["samples"]
        state["sample_latent"] = s
        return {
            "shape": list(s.shape),
            "finite": bool(torch.isfinite(s).all()),
            "s": round(time.time() - t, 1),
        }

    check("sample", sample)

    def lora_merge():
        before = len([m for m in logs if "lora key not loaded" in m])
        merged = run("MUMULoraMerge", model=state["vega"], bundle="mumu-sdxl.safetensors", strength=1.0).args[
            0
        ]
        after = len([m for m in logs if "lora key not loaded" in m])
        state["merged"] = merged
        bundle_mod = next(m for n, m in sys.modules.items() if n.endswith(".nodes.lora"))
        from mumu_core.bundle import kohya_unet_lora, load_bundle

        n_modules = len(
            {
                k.split(".")[0]
                for k in kohya_unet_lora(
                    load_bundle(os.path.join(models_dir, "mumu", "mumu-sdxl.safetensors"))
                )
            }
        )
        return {
            "class": type(merged).__name__,
            "patched_keys": len(merged.patches),
            "lora_modules": n_modules,
            "rejected_keys": after - before,
            "is_clone": merged is not state["vega"] and merged.is_clone(state["vega"]),
            "module": bundle_mod.__name__.split(".")[-1],
        }

    check("lora_merge", lora_merge)

    def live_unet():
        """The host's UNet must react to what MUMU feeds it: a dead model (output 0) fails here.

        Compared with the sample check's latent (same seed, steps, sampler): the same inputs through new
        objects, other references (same text, token counts and so context length), and the LoRA-merged model.
        """
        spec_again = run(
            "MUMUPromptBuilder",
            text=text,
            image1=man.clone(),
            image2=dog.clone(),
            image3=style.clone(),
            tokens3="64",
            weight2=0.5,
        ).args[0]
        spec_other = run(
            "MUMUPromptBuilder", text=text, image1=dog, image2=style, image3=man, tokens3="64", weight2=0.5
        ).args[0]
        cond_again = run("MUMUEncoder", mumu_model=state["model"], mumu_prompt=spec_again, **sizes64).args
        cond_other = run("MUMUEncoder", mumu_model=state["model"], mumu_prompt=spec_other, **sizes64).args
        base = state["sample_latent"]

        def diff(model, cond) -> float:
            latent = {"samples": torch.zeros(1, 4, 8, 8)}
            out = comfy_nodes.common_ksampler(model, 0, 2, 5.0, "ddim", "normal", cond[0], cond[1], latent)
            return float((out[0]["samples"] - base).abs().max())

        return {
            "context_same_shape": list(cond_other[0][0][0].shape) == list(state["positive"][0][0].shape),
            "context_diff": float((cond_other[0][0][0] - state["positive"][0][0]).abs().max()),
            "latent_abs_mean": float(base.abs().mean()),
            "same_inputs_diff": diff(state["vega"], cond_again),
            "other_reference_diff": diff(state["vega"], cond_other),
            "lora_diff": diff(state["merged"], (state["positive"], state["negative"])),
        }

    check("live_unet", live_unet)

    def not_sdxl():
        import comfy.model_patcher
        import comfy.supported_models

        # A real (small) SD1.x-style ComfyUI model: same classes as SD1.5, fewer channels.
        unet_config = {
            "context_dim": 768,
            "model_channels": 32,
            "use_linear_in_transformer": False,
            "adm_in_channels": None,
            "use_temporal_attention": False,
            "in_channels": 4,
            "out_channels": 4,
            "num_res_blocks": [1, 1],
            "channel_mult": [1, 2],
            "transformer_depth": [1, 1],
            "transformer_depth_output": [1, 1, 1, 1],
            "transformer_depth_middle": 1,
            "image_size": 32,
            "use_spatial_transformer": True,
            "legacy": False,
            "num_head_channels": -1,
            "num_heads": 8,
            "use_temporal_resblock": False,
            "use_checkpoint": False,
        }
        cfg = comfy.supported_models.SD15(unet_config)
        base = cfg.get_model({})
        sd15 = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
        try:
            run("MUMULoraMerge", model=sd15, bundle="mumu-sdxl.safetensors", strength=1.0)
            return {"error": None}
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}"}

    check("not_sdxl", not_sdxl)

    def save_lora():
        out = run("MUMUSaveLora", bundle="mumu-sdxl.safetensors", filename_prefix="mumu/test_lora")
        path = out.args[0]
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        before = len([m for m in logs if "lora key not loaded" in m])
        # The stock LoraLoaderModelOnly node on the exported file.
        stock = comfy_nodes.LoraLoaderModelOnly()
        folder_paths.filename_list_cache.clear()
        name = os.path.relpath(path, folder_paths.get_folder_paths("loras")[0])
        patched = stock.load_lora_model_only(state["vega"], name, 1.0)[0]
        after = len([m for m in logs if "lora key not loaded" in m])
        return {
            "path": path,
            "in_loras": path.startswith(os.path.join(work, "loras")),
            "keys": len(lora),
            "all_kohya": all(k.startswith("lora_unet_") for k in lora),
            "patched_keys": len(patched.patches),
            "rejected_keys": after - before,
            "ui": out.ui.as_dict() if hasattr(out.ui, "as_dict") else out.ui,
        }

    check("save_lora", save_lora)

    def interrupt():
        spec = run("MUMUPromptBuilder", text="an interrupted <image>", image1=style).args[0]
        mm.interrupt_current_processing(True)
        try:
            run(
                "MUMUEncoder",
                mumu_model=state["model"],
                mumu_prompt=spec,
                width=64,
                height=64,
                crop_w=0,
                crop_h=0,
                target_width=64,
                target_height=64,
            )
            return {"raised": None}
        except mm.InterruptProcessingException:
            return {"raised": "InterruptProcessingException"}
        finally:
            mm.interrupt_current_processing(False)

    check("interrupt", interrupt)

    def ui_error_names():
        """The exception type names ComfyUI's UI shows (execution.full_type_name) for the pack's errors."""
        out = {}
        cases = {
            "prompt": lambda: run("MUMUPromptBuilder", text=text, image1=man, image2=dog),
            "model_file": lambda: run(
                "MUMULoader", vlm="idefics2-8b", bundle="nope.safetensors", dtype="auto", device="cpu only"
            ),
            "conditioning": lambda: run(
                "MUMUEncoder",
                mumu_model=state["model"],
                mumu_prompt=run("MUMUPromptBuilder", text="a <image>", image1=man.repeat(2, 1, 1, 1)).args[0],
                **sizes64,
            ),
        }
        for name, fn in cases.items():
            try:
                fn()
                out[name] = None
            except Exception as e:
                out[name] = execution.full_type_name(type(e))
                out[f"{name}_message"] = str(e)
        return out

    check("ui_error_names", ui_error_names)

    def loadimage_mask():
        """The stock LoadImage's MASK of a partly transparent PNG (1 = transparent) wired in directly."""
        from PIL import Image, ImageDraw

        folder_paths.set_input_directory(os.path.join(work, "input"))
        os.makedirs(folder_paths.get_input_directory(), exist_ok=True)
        im = Image.new("RGBA", (48, 40), (255, 255, 255, 0))
        ImageDraw.Draw(im).ellipse((10, 8, 38, 44), fill=(200, 30, 30, 255))
        im.save(os.path.join(folder_paths.get_input_directory(), "mumu_cutout.png"))
        image, mask = comfy_nodes.LoadImage().load_image("mumu_cutout.png")
        res = {"mask_mean": float(mask.mean()), "mask_shape": list(mask.shape)}
        try:
            run("MUMUPromptBuilder", text="a <image> ball", image1=image, mask1=mask)
            res["direct"] = None
        except Exception as e:
            res["direct"] = f"{type(e).__name__}: {e}"
        spec = run("MUMUPromptBuilder", text="a <image> ball", image1=image, mask1=1.0 - mask).args[
            0
        ]  # InvertMask
        kept = spec.prompts(16)[0].images[0].mask
        res["inverted_keeps_subject"] = kept.getpixel((24, 30)) == 255 and kept.getpixel((0, 0)) == 0
        return res

    check("loadimage_mask", loadimage_mask)

    def segment():
        face = torch.rand(1, 72, 64, 3, generator=torch.Generator().manual_seed(3))
        seg = dict(detector="grounding-dino-base", sam="sam-vit-base", box_threshold=0.3, margin=0.05)
        ref, mask = run("MUMUSegmentReference", image=face, phrase="person", **seg).args
        # The tiny random SAM's mask is arbitrary; where it happens to keep the border and blank the middle
        # the builder's inverted-alpha-mask rule refuses it (recorded). The wiring is checked either way.
        refused = None
        try:
            spec = run(
                "MUMUPromptBuilder", text="a photo of <image> on the moon", image1=ref, mask1=mask
            ).args[0]
        except Exception as e:  # noqa: BLE001 - recorded for the test to judge
            refused = f"{type(e).__name__}: {e}"
            spec = run("MUMUPromptBuilder", text="a photo of <image> on the moon", image1=ref).args[0]
        background = mask[0] == 0
        cls = ours["MUMUSegmentReference"]
        return {
            "image": list(ref.shape),
            "mask": list(mask.shape),
            "mask_kept": float(mask.mean()),
            "background_black": bool((ref[0][background] == 0).all()),
            "batch": run("MUMUSegmentReference", image=face.repeat(2, 1, 1, 1), phrase="person", **seg)
            .args[1]
            .shape[0],
            "prompt_slots": len(spec.slots),
            "builder_refused_mask": refused,
            "missing_detector": cls.validate_inputs(detector="nope-dino"),
            "good_detector": cls.validate_inputs(detector="grounding-dino-base"),
        }

    check("segment", segment)
    report["logs_tail"] = logs[-20:]
    print(json.dumps(report))


if __name__ == "__main__":
    main()

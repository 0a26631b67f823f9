"""Every MUMU node's define_schema() and execute() inside a real ComfyUI (subprocess with its python).

The pack is loaded by ComfyUI's own nodes.load_custom_node; models come through extra_model_paths.yaml.
See comfy_node_check.py for what runs there; this file asserts on its JSON report.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from check_runner import run_check_script

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

NODE_IDS = [
    "MUMUEncoder",
    "MUMUKVCache",
    "MUMULoader",
    "MUMULoraMerge",
    "MUMUMiniLoader",
    "MUMUMiniSampler",
    "MUMUPromptBuilder",
    "MUMUSaveLora",
    "MUMUSegmentReference",
]


@pytest.fixture(scope="module")
def report(comfy_env, comfy_models, sdxl_checkpoint, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("comfy_node_check")
    data = run_check_script(
        "comfy_node_check.py", comfy_env, comfy_models, sdxl_checkpoint, work, timeout=1800
    )
    data["work"] = str(work)
    return data


def test_pack_loads_with_every_node(report):
    assert report["loaded"] is True
    assert report["nodes"] == NODE_IDS
    assert not report["errors"], "\n\n".join(f"{e['check']}: {e['tb']}" for e in report["errors"])


def test_a_comfyui_without_the_v3_api_gets_a_clear_error(report):
    old = report["old_comfy"]
    assert old["loaded"] is False
    assert old["messages"] and "update ComfyUI" in old["messages"][0]


def test_schemas(report):
    s = report["checks"]["schemas"]
    assert all(s[n]["category"].startswith("MUMU") for n in NODE_IDS)
    assert s["MUMULoader"]["outputs"] == ["MUMU_MODEL"]
    assert s["MUMUPromptBuilder"]["outputs"] == ["MUMU_PROMPT"]
    assert s["MUMUEncoder"]["outputs"] == ["CONDITIONING", "CONDITIONING"]
    assert s["MUMUEncoder"]["input_types"]["mumu_model"] == "MUMU_MODEL"
    assert s["MUMULoraMerge"]["outputs"] == ["MODEL"] and s["MUMUSaveLora"]["output_node"] is True
    types = s["MUMUPromptBuilder"]["input_types"]
    assert [k for k, v in types.items() if v == "IMAGE"] == ["image1", "image2", "image3", "image4"]
    assert [k for k, v in types.items() if v == "MASK"] == ["mask1", "mask2", "mask3", "mask4"]
    # Dropdowns from folders registered by the pack and filled through extra_model_paths.yaml.
    assert s["_choices"] == {"vlm": ["idefics2-8b"], "bundle": ["mumu-sdxl.safetensors"]}


def test_missing_files_name_the_expected_path_against_their_own_input(report, comfy_models):
    v = report["checks"]["validation"]
    assert v["good"] is True and v["queue_good"] == {}
    assert str(comfy_models / "LLM" / "nope-vlm") in v["missing_vlm"] and "config.json" in v["missing_vlm"]
    # ComfyUI's queue-time validation: each missing file is reported against its own input only.
    assert list(v["queue_missing_vlm"]) == ["vlm"]
    assert str(comfy_models / "LLM" / "nope-vlm") in v["queue_missing_vlm"]["vlm"]
    # ComfyUI does no dropdown check of V3 combos, so a missing bundle passes the queue and the Loader
    # fails first thing in execute(), naming the expected path (test_error_types_read_cleanly_in_the_ui).
    assert v["queue_missing_bundle"] == {}


def test_loader_wraps_the_model_in_a_model_patcher(report):
    lo = report["checks"]["loader"]
    assert lo["patcher"] == "comfy.model_patcher.ModelPatcher"
    assert lo["load_device"] == "cpu" and lo["offload_device"] == "cpu"  # --cpu
    assert lo["tokens_per_image"] == 16 and lo["negative_pooled"] == "zeros"


def test_prompt_builder_errors(report):
    p = report["checks"]["prompt"]
    assert p["batch"] == 1 and p["slots"] == 3
    e = p["errors"]
    assert "names image 3, but 2 image(s)" in e["too_few_images"]
    assert "image1 is not connected" in e["gap"]
    assert "64x64 placeholder" in e["mask_lo"]
    assert "different batch sizes" in e["batches"]


def test_encoder_gives_exact_sdxl_conditioning(report):
    enc = report["checks"]["encoder"]
    (pos,), (neg,) = enc["positive"], enc["negative"]
    keys = [
        "crop_h",
        "crop_w",
        "height",
        "mumu_kv_cache",
        "pooled_output",
        "target_height",
        "target_width",
        "width",
    ]
    # text bytes + per image <fake> + tokens x <image> + <fake>: 16 + 16 + 64 image tokens here.
    assert pos["context"][0] == 1 and pos["context"][2] == 2048 and pos["context"][1] > 96
    assert pos["keys"] == keys and neg["keys"] == keys
    assert pos["pooled"] == [1, 1280] and neg["pooled"] == [1, 1280]
    assert pos["dtype"] == "torch.float32" and pos["device"] == "cpu"
    assert pos["sizes"] == {
        "crop_h": 0,
        "crop_w": 0,
        "height": 64,
        "mumu_kv_cache": True,  # the K/V cache marker (nodes/kv_cache.py), default on
        "target_height": 64,
        "target_width": 64,
        "width": 64,
    }
    assert neg["context"] == pos["context"] and neg["sizes"] == pos["sizes"]
    assert pos["abs_sum"] > 0 and neg["abs_sum"] == 0 and neg["pooled_abs_sum"] == 0
    # Cached: the second run of an unchanged prompt does not call the VLM.
    assert enc["vlm_calls_first"] == 1 and enc["vlm_calls_second"] == 0 and enc["same_output_second"]
    # "offload after encoding": not left among ComfyUI's loaded models.
    assert enc["patcher_loaded_after_encode"] is False


def test_batched_images_make_batched_conditioning(report):
    b = report["checks"]["batch_encode"]
    assert b["positive"][0] == 2 and b["pooled"] == [2, 1280] and b["negative"] == b["positive"]


def test_a_prompt_batch_larger_than_the_latent_batch_is_refused(report):
    r = report["checks"]["batch_encode"]["refused"]
    assert r["no_latent"].startswith(
        "ComfyUI-MUMU.ConditioningFormatError: this prompt makes 2 conditionings"
    )
    assert "latent batch is 1 but the prompt makes 2" in r["latent_1"]


def test_stock_ksampler_samples_with_it(report):
    assert report["checks"]["vega"]["class"] == "SDXL"
    s = report["checks"]["sample"]
    assert s["shape"] == [1, 4, 8, 8] and s["finite"]


def test_lora_merge_loads_every_key(report):
    m = report["checks"]["lora_merge"]
    assert m["is_clone"] and m["rejected_keys"] == 0
    assert m["patched_keys"] == m["lora_modules"] > 0


def test_the_host_unet_follows_references_and_lora_and_is_deterministic(report):
    u = report["checks"]["live_unet"]
    assert u["context_same_shape"] and u["context_diff"] > 0
    assert u["latent_abs_mean"] > 0
    assert u["same_inputs_diff"] == 0.0  # identical inputs, identical latents
    # A dead UNet (zero GroupNorm scales) gives 0 for both.
    scale = u["latent_abs_mean"]  # random weights give large latents (~100): compare relative to them
    assert u["other_reference_diff"] > 1e-3 * scale, u
    assert u["lora_diff"] > 1e-3 * scale, u


def test_lora_merge_refuses_a_non_sdxl_model(report):
    err = report["checks"]["not_sdxl"]["error"]
    assert err.startswith("NotSDXLError") and "context_dim=768" in err


def test_saved_lora_is_kohya_and_loads_in_the_stock_loader(report):
    s = report["checks"]["save_lora"]
    assert s["in_loras"] and s["path"].endswith("test_lora_00001_.safetensors") and Path(s["path"]).is_file()
    assert s["all_kohya"] and s["keys"] == 3 * s["patched_keys"]
    assert s["rejected_keys"] == 0


def test_error_types_read_cleanly_in_the_ui(report, comfy_models):
    names = report["checks"]["ui_error_names"]
    assert str(comfy_models / "mumu" / "nope.safetensors") in names.pop("model_file_message")
    for k in ("prompt", "conditioning"):
        names.pop(f"{k}_message")
    assert names == {
        "prompt": "mumu_core.prompt.PromptError",
        "model_file": "ComfyUI-MUMU.ModelFileError",
        "conditioning": "ComfyUI-MUMU.ConditioningFormatError",
    }


def test_loadimage_mask_of_a_transparent_png_is_refused_with_the_fix(report):
    m = report["checks"]["loadimage_mask"]
    assert 0 < m["mask_mean"] < 1 and m["mask_shape"] == [1, 40, 48]
    assert m["direct"].startswith("PromptError") and "InvertMask" in m["direct"]
    assert m["inverted_keeps_subject"]


def test_segment_node_cuts_out_the_reference_for_the_prompt_builder(report, comfy_models):
    s = report["checks"]["segment"]
    assert s["image"][0] == 1 and s["image"][3] == 3 and s["mask"] == s["image"][:3]
    assert 0 < s["mask_kept"] <= 1 and s["background_black"]
    assert s["batch"] == 2 and s["prompt_slots"] == 1
    # Only the inverted-alpha-mask rule may refuse the (random) tiny SAM's mask, never anything else.
    assert s["builder_refused_mask"] is None or "InvertMask" in s["builder_refused_mask"], s[
        "builder_refused_mask"
    ]
    assert s["good_detector"] is True
    assert str(comfy_models / "grounding-dino" / "nope-dino") in s["missing_detector"]


def test_interrupt_is_honoured(report):
    assert report["checks"]["interrupt"]["raised"] == "InterruptProcessingException"

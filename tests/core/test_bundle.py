"""Bundle round trip, compatibility errors, kohya export and LoRA fusing, on the tiny model set."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mumu_core import bundle as B
from mumu_core.connector import ConnectorConfig, MumuConnector
from mumu_core.presets import TINY, build_unet
from mumu_core.sdxl import LDM_UNET_PREFIX, load_sdxl


@pytest.fixture(scope="module")
def tiny_bundle(tiny_models) -> B.MumuBundle:
    return B.load_bundle(tiny_models.bundle)


def unet_inputs(seed: int = 0, n: int = 5):
    g = torch.Generator().manual_seed(seed)
    cfg = TINY.unet
    x = torch.randn(2, cfg["in_channels"], 16, 16, generator=g)
    ctx = torch.randn(2, n, cfg["cross_attention_dim"], generator=g)
    added = {
        "text_embeds": torch.randn(2, TINY.connector.pooled_dim, generator=g),
        "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2),
    }
    return x, torch.tensor([10, 500]), ctx, added


@torch.no_grad()
def unet_out(unet) -> torch.Tensor:
    x, t, ctx, added = unet_inputs()
    return unet(x, t, ctx, added_cond_kwargs=added).sample


def runtime_lora_output(tiny_models, bundle, scale: float = 1.0) -> torch.Tensor:
    unet = load_sdxl(tiny_models.sdxl, TINY).unet
    B.apply_unet_lora(unet, bundle, scale)
    return unet_out(unet)


# -- round trip ---------------------------------------------------------------------------------------


def assert_bundles_equal(a: B.MumuBundle, b: B.MumuBundle) -> None:
    assert a.meta == b.meta
    for name in ("connector_state", "vlm_lora_state", "unet_lora_state"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (name, k)


def test_round_trip_is_exact(tiny_bundle, tmp_path):
    assert tiny_bundle.vlm_lora_state and tiny_bundle.unet_lora_state
    # The tiny set's LoRAs are non-zero, so LoRA tests below are not vacuous.
    assert any(v.abs().sum() > 0 for k, v in tiny_bundle.unet_lora_state.items() if "lora_B" in k)
    out = B.save_bundle(tiny_bundle, tmp_path / "copy.safetensors")
    assert_bundles_equal(tiny_bundle, B.load_bundle(out))
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


def test_round_trip_bf16_and_empty_loras(tmp_path):
    cfg = ConnectorConfig(in_dim=16, width=8, layers=1, heads=2, context_dim=64, pooled_dim=32)
    connector = MumuConnector(cfg).to(torch.bfloat16)
    b = B.make_bundle(TINY, connector, tokens_per_image=9, negative_pooled="keep")
    assert b.meta.vlm_lora is None and not b.unet_lora_state
    loaded = B.load_bundle(B.save_bundle(b, tmp_path / "b.safetensors"))
    assert_bundles_equal(b, loaded)
    assert loaded.meta.tokens_per_image == 9 and loaded.meta.negative_pooled == "keep"


def test_metadata_layout_matches_architecture(tiny_models):
    with safe_open(str(tiny_models.bundle), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    for field in (
        "format_version", "base_vlm", "base_unet", "connector", "vlm_lora", "unet_lora",
        "tokens_per_image", "hidden_state_layer", "negative_pooled", "prediction_type",
    ):  # fmt: skip
        assert f"mumu.{field}" in meta
    assert json.loads(meta["mumu.format_version"]) == B.FORMAT_VERSION
    assert json.loads(meta["mumu.connector"])["in_dim"] == TINY.connector.in_dim
    assert json.loads(meta["mumu.unet_lora"]) == {
        "rank": 4,
        "alpha": 8.0,
        "targets": sorted(B.UNET_LORA_TARGETS),
    }
    assert {k.split(".")[0] for k in keys} == {"connector", "vlm_lora", "unet_lora"}


# -- bad files ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(B.BundleError, match="does not exist.*MUMU bundle"):
        B.load_bundle(tmp_path / "nope.safetensors")


def test_truncated_file(tiny_models, tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(tiny_models.bundle.read_bytes()[:1000])
    with pytest.raises(B.BundleError, match="cut.safetensors.*corrupt"):
        B.load_bundle(bad)


def test_not_a_bundle(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(B.BundleError, match="without mumu.* metadata"):
        B.load_bundle(lora)


def test_newer_format(tiny_bundle, tmp_path):
    b = dataclasses.replace(tiny_bundle, meta=dataclasses.replace(tiny_bundle.meta, format_version=99))
    path = B.save_bundle(b, tmp_path / "new.safetensors")
    with pytest.raises(B.BundleError, match="format 99.*update"):
        B.load_bundle(path)


def test_connector_shape_differs_from_metadata(tiny_bundle, tmp_path):
    wide = ConnectorConfig(**{**dataclasses.asdict(tiny_bundle.meta.connector), "width": 64})
    b = dataclasses.replace(tiny_bundle, connector_state=MumuConnector(wide).state_dict())
    path = B.save_bundle(b, tmp_path / "x.safetensors")
    with pytest.raises(B.BundleMismatchError, match="do not match its recorded config"):
        B.load_bundle(path)


# -- compatibility ------------------------------------------------------------------------------------


def test_bundle_for_another_vlm(tiny_models, tmp_path):
    cfg = ConnectorConfig(in_dim=128, width=32, layers=1, heads=2, context_dim=64, pooled_dim=32)
    b = B.make_bundle(TINY, MumuConnector(cfg))
    assert b.meta.base_vlm["hidden_size"] == 128
    with pytest.raises(B.BundleMismatchError, match=r"hidden_size=128.*hidden_size=64"):
        B.load_conditioner(tiny_models.vlm, b)


def test_bundle_vlm_lora_for_another_layout(tiny_bundle, tiny_models):
    lora = {k: v for k, v in tiny_bundle.vlm_lora_state.items() if "layers.1." not in k}
    b = dataclasses.replace(tiny_bundle, vlm_lora_state=lora)
    with pytest.raises(B.BundleMismatchError, match="VLM LoRA does not fit"):
        B.load_conditioner(tiny_models.vlm, b)


def test_bundle_for_another_unet(tiny_bundle):
    meta = dataclasses.replace(
        tiny_bundle.meta, base_unet={**tiny_bundle.meta.base_unet, "cross_attention_dim": 2048}
    )
    b = dataclasses.replace(tiny_bundle, meta=meta)
    with pytest.raises(B.BundleMismatchError, match=r"cross_attention_dim=2048.*cross_attention_dim=64"):
        B.check_unet_compatible(b, TINY.unet)


def test_unet_lora_for_another_layout(tiny_bundle):
    # Same widths, one more transformer layer: the LoRA must not half-load.
    unet = build_unet(dataclasses.replace(TINY, unet={**TINY.unet, "transformer_layers_per_block": [1, 2]}))
    with pytest.raises(B.BundleMismatchError, match="UNet LoRA does not fit"):
        B.apply_unet_lora(unet, tiny_bundle)
    assert not getattr(unet, "peft_config", None)  # nothing left behind


def test_load_conditioner_applies_vlm_lora(tiny_models, tiny_bundle):
    from mumu_core.prompt import InterleavedPrompt

    prompt = [InterleavedPrompt.parse("a red cube")]
    with torch.no_grad():
        with_lora = B.load_conditioner(tiny_models.vlm, tiny_bundle).encode(prompt).context
        no_lora = dataclasses.replace(
            tiny_bundle, vlm_lora_state={}, meta=dataclasses.replace(tiny_bundle.meta, vlm_lora=None)
        )
        without = B.load_conditioner(tiny_models.vlm, no_lora).encode(prompt).context
    assert not torch.allclose(with_lora, without, atol=1e-4)


# -- kohya export -------------------------------------------------------------------------------------


def comfyui_lora_unet_names(unet) -> set[str]:
    """The ``lora_unet_*`` names ComfyUI's LoRA loader maps for an SDXL UNet: one per weight of the
    diffusers UNet, dots as underscores (comfy.lora.model_lora_keys_unet)."""
    return {
        "lora_unet_" + k[: -len(".weight")].replace(".", "_")
        for k in unet.state_dict()
        if k.endswith(".weight")
    }


def test_kohya_keys(tiny_bundle, tiny_models):
    sd = B.kohya_unet_lora(tiny_bundle)
    assert all(B.KOHYA_KEY_RE.match(k) for k in sd)
    modules = {k.split(".")[0] for k in sd}
    assert len(sd) == 3 * len(modules) == 3 * len(tiny_bundle.unet_lora_state) // 2
    assert all(float(sd[f"{m}.alpha"]) == 8.0 for m in modules)
    assert all(sd[f"{m}.lora_down.weight"].shape[0] == 4 for m in modules)
    # ComfyUI's stock loader would reject any name it cannot map.
    assert modules <= comfyui_lora_unet_names(load_sdxl(tiny_models.sdxl, TINY).unet)
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0" in modules


def test_kohya_reloads_in_diffusers_with_identical_outputs(tiny_bundle, tiny_models, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft import get_peft_model_state_dict

    path = B.export_kohya_unet_lora(tiny_bundle, tmp_path / "lora.safetensors")
    assert load_file(str(path)).keys() == B.kohya_unet_lora(tiny_bundle).keys()
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path))
    unet = load_sdxl(tiny_models.sdxl, TINY).unet
    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet, adapter_name="kohya")
    assert len(get_peft_model_state_dict(unet, adapter_name="kohya")) == len(tiny_bundle.unet_lora_state)
    reloaded = unet_out(unet)
    runtime = runtime_lora_output(tiny_models, tiny_bundle)
    base = unet_out(load_sdxl(tiny_models.sdxl, TINY).unet)
    assert (runtime - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(reloaded, runtime, rtol=0, atol=1e-6)


# -- fusing -------------------------------------------------------------------------------------------


def test_fuse_single_file_equals_runtime_lora(tiny_bundle, tiny_models, tmp_path):
    out = B.fuse_unet_lora_into_checkpoint(
        tiny_bundle, tiny_models.sdxl_single_file, tmp_path / "fused.safetensors", 0.7
    )
    fused = load_sdxl(out, TINY).unet
    torch.testing.assert_close(
        unet_out(fused), runtime_lora_output(tiny_models, tiny_bundle, 0.7), rtol=1e-5, atol=1e-5
    )
    before, after = load_file(str(tiny_models.sdxl_single_file)), load_file(str(out))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Exactly the LoRA-targeted projections change; VAE and everything else are copied bit for bit.
    assert changed and all(
        k.startswith(LDM_UNET_PREFIX) and ".to_" in k and k.endswith("weight") for k in changed
    )
    assert len(changed) == len(tiny_bundle.unet_lora_state) // 2
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["mumu.fused_unet_lora"])["scale"] == 0.7


def test_fuse_diffusers_folder_equals_runtime_lora(tiny_bundle, tiny_models, tmp_path):
    out = B.fuse_unet_lora_into_checkpoint(tiny_bundle, tiny_models.sdxl, tmp_path / "fused.safetensors")
    comps = load_sdxl(out, TINY)
    torch.testing.assert_close(
        unet_out(comps.unet), runtime_lora_output(tiny_models, tiny_bundle), rtol=1e-5, atol=1e-5
    )
    vae_ref = load_sdxl(tiny_models.sdxl, TINY).vae.state_dict()
    assert all(torch.equal(v, vae_ref[k]) for k, v in comps.vae.state_dict().items())


def test_fuse_refuses_bad_targets(tiny_bundle, tiny_models, tmp_path):
    with pytest.raises(B.BundleError, match="overwrite the input"):
        B.fuse_unet_lora_into_checkpoint(
            tiny_bundle, tiny_models.sdxl_single_file, tiny_models.sdxl_single_file
        )
    empty = dataclasses.replace(tiny_bundle, unet_lora_state={})
    with pytest.raises(B.BundleError, match="no UNet LoRA"):
        B.fuse_unet_lora_into_checkpoint(empty, tiny_models.sdxl_single_file, tmp_path / "o.safetensors")
    assert not Path(tmp_path / "o.safetensors").exists()

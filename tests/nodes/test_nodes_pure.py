"""The comfy-free parts of nodes/: CONDITIONING structure, prompt batching, cache, folders, checks.

Runs in CI without ComfyUI, on tiny models built from the real model classes.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from mumu_core.conditioning import MumuConditioner, SDXLConditioning
from mumu_core.connector import MumuConnector
from mumu_core.encoder import MumuEncoder
from mumu_core.presets import TINY
from mumu_core.prompt import InterleavedPrompt, PromptError
from nodes.conditioning_format import (
    SIZE_KEYS,
    ConditioningFormatError,
    NotSDXLError,
    check_comfy_conditioning,
    check_sdxl_unet_config,
    kohya_module_names,
    missing_lora_modules,
    size_info,
    stack_conditionings,
    to_comfy,
)
from nodes.encoding import EncodeCache, cache_key, encode_prompts, prompt_digest
from nodes.model_folders import (
    ModelFileError,
    file_identity,
    list_hf_folders,
    resolve_bundle,
    resolve_hf_folder,
)
from nodes.prompt_spec import TOKEN_CHOICES, build_prompt_spec, parse_tokens

SDXL_CONNECTOR = replace(TINY.connector, context_dim=2048, pooled_dim=1280)
TEXT3 = "a <image1> man and his <image2> dog in an <image3> animated style"


def img(h: int, w: int, b: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def spec_of(text: str, *images, masks=None, tokens=None, weights=None):
    n = 4
    images = list(images) + [None] * (n - len(images))
    return build_prompt_spec(
        text,
        images,
        list(masks or []) + [None] * (n - len(masks or [])),
        list(tokens or []) + ["default"] * (n - len(tokens or [])),
        list(weights or []) + [1.0] * (n - len(weights or [])),
    )


@pytest.fixture(scope="module")
def sdxl_conditioner(tiny_models) -> MumuConditioner:
    """Tiny Idefics2 + a connector with SDXL's output widths (2048 context, 1280 pooled)."""
    encoder = MumuEncoder.from_pretrained(tiny_models.vlm)
    torch.manual_seed(0)
    return MumuConditioner(encoder, MumuConnector(SDXL_CONNECTOR)).eval()


# -- CONDITIONING structure -----------------------------------------------------------------------------


def test_to_comfy_is_the_exact_sdxl_structure(sdxl_conditioner):
    spec = spec_of(
        TEXT3, img(40, 30), img(32, 48, seed=1), img(36, 36, seed=2), tokens=["4", "default", "16"]
    )
    prompts = spec.prompts(default_tokens=9)
    cond = encode_prompts(sdxl_conditioner, prompts, "m", cache=EncodeCache())
    sizes = size_info(832, 1216)
    positive, negative = to_comfy(cond, sizes)
    check_comfy_conditioning(positive)
    check_comfy_conditioning(negative)
    assert len(positive) == len(negative) == 1
    (ctx, extras), (nctx, nextras) = positive[0], negative[0]
    assert set(extras) == {"pooled_output", *SIZE_KEYS}
    assert (
        extras["width"] == extras["target_width"] == 832
        and extras["height"] == extras["target_height"] == 1216
    )
    assert extras["crop_w"] == extras["crop_h"] == 0
    assert ctx.dtype == torch.float32 and ctx.device.type == "cpu"
    assert ctx.shape[0] == 1 and ctx.shape[2] == 2048 and extras["pooled_output"].shape == (1, 1280)
    # Token count: the tokenizer's ids for text + <fake><image>*k<fake> per image.
    expected_n = len(sdxl_conditioner.encoder.tokenize(prompts[0]))
    assert ctx.shape[1] == expected_n
    assert sum(r.tokens for r in prompts[0].images) == 4 + 9 + 16
    # The negative: zeros of the positive's shape (docs/ARCHITECTURE.md), so ComfyUI batches CFG.
    assert nctx.shape == ctx.shape and not nctx.any() and ctx.abs().sum() > 0
    assert nextras["pooled_output"].shape == (1, 1280) and not nextras["pooled_output"].any()
    assert {k: nextras[k] for k in SIZE_KEYS} == {k: extras[k] for k in SIZE_KEYS}


def test_negative_keeps_pooled_when_the_bundle_says_so():
    cond = SDXLConditioning(torch.randn(2, 5, 2048), torch.randn(2, 1280), torch.ones(2, 5, dtype=torch.bool))
    pos, neg = to_comfy(cond, size_info(64, 64), negative_pooled="keep")
    assert torch.equal(neg[0][1]["pooled_output"], pos[0][1]["pooled_output"])
    assert not neg[0][0].any()
    with pytest.raises(ConditioningFormatError, match="negative_pooled"):
        to_comfy(cond, size_info(64, 64), negative_pooled="half")


def test_non_sdxl_widths_are_refused():
    cond = SDXLConditioning(torch.randn(1, 5, 64), torch.randn(1, 32), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ConditioningFormatError, match="not made for SDXL"):
        to_comfy(cond, size_info(64, 64))


def test_check_comfy_conditioning_rejects_broken_structures():
    good = [[torch.zeros(1, 3, 2048), {"pooled_output": torch.zeros(1, 1280), **size_info(8, 8)}]]
    check_comfy_conditioning(good)
    with pytest.raises(ConditioningFormatError, match="pooled_output"):
        check_comfy_conditioning([[torch.zeros(1, 3, 2048), size_info(8, 8)]])
    with pytest.raises(ConditioningFormatError, match="pooled_output must be"):
        check_comfy_conditioning(
            [[torch.zeros(2, 3, 2048), {"pooled_output": torch.zeros(1, 1280), **size_info(8, 8)}]]
        )
    with pytest.raises(ConditioningFormatError, match="missing"):
        check_comfy_conditioning([[torch.zeros(1, 3, 2048), {"pooled_output": torch.zeros(1, 1280)}]])


def test_stack_pads_with_zeros_and_keeps_masks():
    a = SDXLConditioning(torch.ones(1, 3, 4), torch.ones(1, 2), torch.ones(1, 3, dtype=torch.bool))
    b = SDXLConditioning(torch.full((1, 5, 4), 2.0), torch.zeros(1, 2), torch.ones(1, 5, dtype=torch.bool))
    s = stack_conditionings([a, b])
    assert s.context.shape == (2, 5, 4)
    assert not s.context[0, 3:].any() and s.context[0, :3].eq(1).all()
    assert s.attention_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]


def test_size_info_rejects_negative():
    with pytest.raises(ConditioningFormatError, match="crop_w"):
        size_info(64, 64, crop_w=-1)


# -- the Prompt Builder's inputs ------------------------------------------------------------------------


def test_prompt_spec_batching_rules():
    spec = spec_of("a <image> with <image>", img(20, 20, b=3), img(10, 12))
    assert spec.batch == 3
    prompts = spec.prompts(4)
    assert len(prompts) == 3
    # The batch-1 input is shared; the batched one differs per prompt.
    assert prompts[0].images[1].image.tobytes() == prompts[2].images[1].image.tobytes()
    assert prompts[0].images[0].image.tobytes() != prompts[1].images[0].image.tobytes()
    with pytest.raises(PromptError, match="different batch sizes"):
        spec_of("<image> <image>", img(8, 8, b=2), img(8, 8, b=3))


def test_prompt_spec_errors_say_what_to_do():
    with pytest.raises(PromptError, match="image1 is not connected"):
        build_prompt_spec("<image>", [None, img(8, 8), None, None], [None] * 4, ["default"] * 4, [1.0] * 4)
    with pytest.raises(PromptError, match="2 image"):
        spec_of(TEXT3, img(8, 8), img(8, 8))
    with pytest.raises(PromptError, match="not used"):
        spec_of("just text", img(8, 8))
    with pytest.raises(PromptError, match="mixes"):
        spec_of("<image> and <image2>", img(8, 8), img(8, 8))
    with pytest.raises(PromptError, match="mask2 is connected but image2 is not"):
        build_prompt_spec(
            "<image>",
            [img(8, 8), None, None, None],
            [None, torch.ones(8, 8), None, None],
            ["default"] * 4,
            [1.0] * 4,
        )
    with pytest.raises(PromptError, match="square"):
        spec_of("<image>", img(8, 8), tokens=["300"])
    with pytest.raises(PromptError, match="weight1"):
        spec_of("<image>", img(8, 8), weights=[float("nan")])
    with pytest.raises(PromptError, match="IMAGE tensor"):
        spec_of("<image>", torch.rand(8, 8, 3))


def test_masks_keep_the_subject_and_refuse_loadimage_placeholders():
    image = torch.ones(1, 8, 8, 3)
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1.0
    spec = spec_of("<image>", image, masks=[mask])
    ref = spec.prompts(4)[0].images[0]
    from mumu_core.prompt import prepare_image

    prepared = torch.from_numpy(np.array(prepare_image(ref.image, 4, ref.mask)))
    assert prepared[14, 14].tolist() == [255, 255, 255] and prepared[0, 0].tolist() == [0, 0, 0]
    with pytest.raises(PromptError, match="all zero"):
        spec_of("<image>", image, masks=[torch.zeros(1, 8, 8)])
    with pytest.raises(PromptError, match="empty 64x64 placeholder"):
        spec_of("<image>", image, masks=[torch.zeros(1, 64, 64)])
    with pytest.raises(PromptError, match="batch of 2"):
        spec_of("<image>", torch.ones(3, 8, 8, 3), masks=[torch.ones(2, 8, 8)])


def test_token_choices_are_squares():
    assert TOKEN_CHOICES[0] == "default" and "324" in TOKEN_CHOICES and "1296" in TOKEN_CHOICES
    assert all(int(t) ** 0.5 == int(int(t) ** 0.5) for t in TOKEN_CHOICES[1:])
    assert parse_tokens("default") is None and parse_tokens("1296") == 1296


def test_digest_changes_with_every_input():
    base = spec_of("<image> x", img(8, 8), weights=[1.0])
    assert base.digest() == spec_of("<image> x", img(8, 8), weights=[1.0]).digest()
    others = [
        spec_of("<image> y", img(8, 8)),
        spec_of("<image> x", img(8, 8, seed=5)),
        spec_of("<image> x", img(8, 8), weights=[0.5]),
        spec_of("<image> x", img(8, 8), tokens=["16"]),
        spec_of("<image> x", img(8, 8), masks=[torch.ones(1, 8, 8)]),
    ]
    assert len({base.digest(), *(o.digest() for o in others)}) == 6


# -- cached encoding ------------------------------------------------------------------------------------


class Counting:
    def __init__(self, conditioner):
        self.conditioner = conditioner
        self.calls = 0

    def __call__(self, prompts):
        self.calls += 1
        return self.conditioner(prompts)


def test_the_vlm_is_not_called_twice_for_the_same_prompt(sdxl_conditioner):
    counting = Counting(sdxl_conditioner)
    cache = EncodeCache(max_items=4)
    prepared = []
    # Built twice from equal pixels: new objects, same content (what a re-queue produces).
    first = spec_of(TEXT3, img(20, 20), img(20, 30, seed=1), img(16, 16, seed=2)).prompts(4)
    again = spec_of(TEXT3, img(20, 20), img(20, 30, seed=1), img(16, 16, seed=2)).prompts(4)
    a = encode_prompts(counting, first, "model-A", cache=cache, prepare=lambda: prepared.append(1))
    b = encode_prompts(counting, again, "model-A", cache=cache, prepare=lambda: prepared.append(1))
    assert counting.calls == 1 and prepared == [1]
    assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)
    assert cache.hits == 1 and cache.misses == 1
    # Another model identity or another weight is another encoding.
    encode_prompts(counting, again, "model-B", cache=cache)
    reweighted = spec_of(TEXT3, img(20, 20), img(20, 30, seed=1), img(16, 16, seed=2), weights=[1, 0.5, 1])
    encode_prompts(counting, reweighted.prompts(4), "model-A", cache=cache)
    assert counting.calls == 3


def test_cached_batch_equals_direct_encoding_and_reports_progress(sdxl_conditioner):
    spec = spec_of("a <image> and <image>", img(20, 20, b=2), img(12, 12, seed=3))
    prompts = spec.prompts(4)
    progress = []
    cond = encode_prompts(
        sdxl_conditioner, prompts, "m", cache=EncodeCache(), on_progress=lambda d, t: progress.append((d, t))
    )
    assert progress == [(1, 2), (2, 2)]
    with torch.inference_mode():
        direct = sdxl_conditioner(prompts)
    # One prompt at a time + zero padding gives the batched result at real positions.
    assert cond.context.shape == direct.context.shape
    torch.testing.assert_close(cond.context, direct.context, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cond.pooled, direct.pooled, atol=1e-5, rtol=1e-4)


def test_interrupt_stops_before_encoding(sdxl_conditioner):
    counting = Counting(sdxl_conditioner)

    class Stop(Exception):
        pass

    def interrupt():
        raise Stop

    with pytest.raises(Stop):
        encode_prompts(
            counting,
            spec_of("<image>", img(8, 8)).prompts(4),
            "m",
            cache=EncodeCache(),
            check_interrupt=interrupt,
        )
    assert counting.calls == 0


def test_lru_evicts_oldest():
    cache = EncodeCache(max_items=2)
    c = SDXLConditioning(torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
    for k in "abc":
        cache.put(k, c)
    assert cache.get("a") is None and cache.get("c") is c and len(cache) == 2


def test_prompt_digest_covers_masks_and_tokens():
    p = InterleavedPrompt.parse("<image>", [spec_of("<image>", img(8, 8)).slots[0].image(0)], 4)
    q = p.with_tokens(16)
    assert prompt_digest(p) != prompt_digest(q)
    assert cache_key("x", p) != cache_key("y", p)


# -- model checks ---------------------------------------------------------------------------------------

SDXL_LDM = {"context_dim": 2048, "adm_in_channels": 2816, "model_channels": 320, "in_channels": 4}


def test_sdxl_check_on_comfy_unet_configs():
    check_sdxl_unet_config(SDXL_LDM)
    for bad, name in (
        ({"context_dim": 768, "adm_in_channels": None}, "SD1.5"),
        ({"context_dim": 1024, "adm_in_channels": None}, "SD2"),
        ({"context_dim": 1280, "adm_in_channels": 2560}, "refiner"),
    ):
        with pytest.raises(NotSDXLError, match=f"context_dim={bad['context_dim']}"):
            check_sdxl_unet_config(bad, name)


def test_kohya_keys_of_a_real_bundle(tiny_models):
    from mumu_core.bundle import kohya_unet_lora, load_bundle

    sd = kohya_unet_lora(load_bundle(tiny_models.bundle))
    names = kohya_module_names(sd)
    assert names and all(n.startswith("lora_unet_") for n in names)
    assert len(sd) == 3 * len(names)
    assert missing_lora_modules(names, names + ["lora_unet_other"]) == []
    assert missing_lora_modules(names, names[1:]) == [names[0]]


def test_kohya_check_rejects_peft_keys():
    with pytest.raises(ConditioningFormatError, match="not kohya"):
        kohya_module_names(["unet.down_blocks.1.attentions.0.to_k.lora_A.weight"])
    with pytest.raises(ConditioningFormatError, match="without both"):
        kohya_module_names(["lora_unet_a.lora_down.weight", "lora_unet_a.alpha"])
    with pytest.raises(ConditioningFormatError, match="no UNet LoRA"):
        kohya_module_names([])


# -- model folders --------------------------------------------------------------------------------------


def test_hf_folder_listing_and_resolution(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "idefics2-8b").mkdir(parents=True)
    (a / "idefics2-8b" / "config.json").write_text("{}")
    (a / "idefics2-8b" / "sub").mkdir()
    (a / "idefics2-8b" / "sub" / "config.json").write_text("{}")  # inside a model: not listed
    (a / "no-config").mkdir()
    (b / "HuggingFaceM4" / "idefics2-8b").mkdir(parents=True)
    (b / "HuggingFaceM4" / "idefics2-8b" / "config.json").write_text("{}")
    (b / ".cache" / "x").mkdir(parents=True)
    (b / ".cache" / "x" / "config.json").write_text("{}")
    roots = [a, b, tmp_path / "missing"]
    assert list_hf_folders(roots) == ["HuggingFaceM4/idefics2-8b", "idefics2-8b"]
    assert resolve_hf_folder("HuggingFaceM4/idefics2-8b", roots) == b / "HuggingFaceM4" / "idefics2-8b"
    with pytest.raises(ModelFileError, match=str(a / "nope")) as e:
        resolve_hf_folder("nope", roots)
    assert "config.json" in str(e.value) and "preprocessor_config.json" in str(e.value)
    with pytest.raises(ModelFileError, match="no absolute"):
        resolve_hf_folder("../a/idefics2-8b", roots)


def test_bundle_resolution_and_identity(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"x")
    p = resolve_bundle("m.safetensors", [tmp_path])
    ident = file_identity(p)
    assert ident == file_identity(p)
    p.write_bytes(b"xy")
    assert file_identity(p) != ident
    with pytest.raises(ModelFileError, match="models/mumu|mumu"):
        resolve_bundle("other.safetensors", [tmp_path])


def test_text_only_prompt_is_one_prompt_without_images(sdxl_conditioner):
    spec = spec_of("a photo of a dog on a beach")
    assert spec.batch == 1 and spec.slots == ()
    (prompt,) = spec.prompts(4)
    assert prompt.images == ()
    cond = encode_prompts(sdxl_conditioner, [prompt], "m", cache=EncodeCache())
    pos, neg = to_comfy(cond, size_info(64, 64))
    assert pos[0][0].shape == (1, len(sdxl_conditioner.encoder.tokenize(prompt)), 2048)

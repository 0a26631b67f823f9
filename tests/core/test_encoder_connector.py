"""The encoder, connector and conditioning on tiny random models built from the real classes."""

import pytest
import torch
from PIL import Image

from mumu_core.conditioning import MumuConditioner, add_time_ids, drop_conditioning
from mumu_core.connector import ConnectorConfig, MumuConnector
from mumu_core.encoder import EncoderLoadError, MumuEncoder, PerceiverRemoved
from mumu_core.presets import TINY, build_vlm_folder
from mumu_core.prompt import InterleavedPrompt


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    return build_vlm_folder(TINY, tmp_path_factory.mktemp("vlm"), seed=0)


@pytest.fixture(scope="module")
def encoder(vlm_folder):
    return MumuEncoder.from_pretrained(vlm_folder)


def red(w=30, h=40):
    return Image.new("RGB", (w, h), (255, 0, 0))


def test_perceiver_is_really_gone(encoder):
    assert isinstance(encoder.vlm.connector.perceiver_resampler, PerceiverRemoved)
    names = [n for n, _ in encoder.named_parameters()]
    assert not any("perceiver" in n for n in names)
    assert not any("lm_head" in n for n in names)


@pytest.mark.parametrize("tokens", [[4], [9], [4, 16]])
def test_every_patch_is_a_token(encoder, tokens):
    imgs = [red() for _ in tokens]
    text = " and ".join(["<image>"] * len(tokens))
    p = InterleavedPrompt.parse(f"a {text} here", imgs, tokens_per_image=tokens)
    with torch.no_grad():
        out = encoder.encode([p])
    for k, t in enumerate(tokens):
        assert int((out.image_index[0] == k).sum()) == t
    assert out.hidden_states.shape == (1, out.attention_mask.shape[1], encoder.hidden_size)


def test_image_tokens_carry_the_image(encoder):
    """Different images at the same positions change the hidden states; text-only differs from both."""
    a = InterleavedPrompt.parse("a <image> thing", [red()], tokens_per_image=4)
    b = InterleavedPrompt.parse(
        "a <image> thing", [Image.new("RGB", (30, 40), (0, 0, 255))], tokens_per_image=4
    )
    with torch.no_grad():
        ha, hb = encoder.encode([a]).hidden_states, encoder.encode([b]).hidden_states
    assert ha.shape == hb.shape and not torch.allclose(ha, hb)


def test_batch_padding_does_not_change_real_positions(encoder):
    long = InterleavedPrompt.parse(
        "a <image> man and his <image> dog", [red(), red(10, 50)], tokens_per_image=[4, 9]
    )
    short = InterleavedPrompt.parse("short")
    with torch.no_grad():
        both = encoder.encode([long, short])
        alone = encoder.encode([short])
    n = alone.attention_mask.shape[1]
    assert both.attention_mask[1].sum() == n and not both.attention_mask[1, n:].any()
    torch.testing.assert_close(both.hidden_states[1, :n], alone.hidden_states[0], atol=1e-5, rtol=1e-4)


def test_missing_folder_error_names_path_and_contents(tmp_path):
    with pytest.raises(EncoderLoadError, match=r"does not exist.*config\.json"):
        MumuEncoder.from_pretrained(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(EncoderLoadError, match="lacks preprocessor_config.json, model"):
        MumuEncoder.from_pretrained(tmp_path / "half")


def test_dtype_is_selectable(vlm_folder):
    enc = MumuEncoder.from_pretrained(vlm_folder, dtype=torch.bfloat16)
    p = InterleavedPrompt.parse("a <image>", [red()], tokens_per_image=4)
    with torch.no_grad():
        assert enc.encode([p]).hidden_states.dtype == torch.bfloat16


def test_hidden_state_layer_selects_a_layer(vlm_folder):
    last = MumuEncoder.from_pretrained(vlm_folder)
    first = MumuEncoder.from_pretrained(vlm_folder, hidden_state_layer=1)
    p = InterleavedPrompt.parse("words")
    with torch.no_grad():
        assert not torch.allclose(last.encode([p]).hidden_states, first.encode([p]).hidden_states)


def test_vlm_lora_targets_language_model_and_projection_never_vision(vlm_folder):
    enc = MumuEncoder.from_pretrained(vlm_folder)
    enc.add_lora(rank=4, alpha=4)
    keys = list(enc.lora_state_dict())
    assert keys and all("lora_" in k for k in keys)
    assert any("text_model.layers" in k for k in keys)
    assert any("modality_projection" in k for k in keys)
    assert not any("vision_model" in k for k in keys)
    # A LoRA with non-zero B changes outputs; merging keeps them.
    for n, prm in enc.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(prm, std=0.5)
    p = InterleavedPrompt.parse("a <image>", [red()], tokens_per_image=4)
    with torch.no_grad():
        before = enc.encode([p]).hidden_states
        enc.merge_lora()
        after = enc.encode([p]).hidden_states
    torch.testing.assert_close(before, after, atol=1e-4, rtol=1e-4)


def test_connector_padding_mask_is_honoured():
    torch.manual_seed(0)
    cfg = ConnectorConfig(in_dim=16, width=32, layers=3, heads=4, context_dim=24, pooled_dim=12)
    conn = MumuConnector(cfg).eval()
    x = torch.randn(1, 5, 16)
    padded = torch.cat([x, torch.randn(1, 3, 16) * 100], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    with torch.no_grad():
        c1, p1 = conn(x)
        c2, p2 = conn(padded, mask)
    torch.testing.assert_close(c2[:, :5], c1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p2, p1, atol=1e-5, rtol=1e-5)
    assert (c2[:, 5:] == 0).all()
    assert c1.shape == (1, 5, 24) and p1.shape == (1, 12)


def test_connector_is_non_causal():
    torch.manual_seed(0)
    conn = MumuConnector(
        ConnectorConfig(in_dim=8, width=16, layers=2, heads=2, context_dim=8, pooled_dim=8)
    ).eval()
    x = torch.randn(1, 4, 8)
    y = x.clone()
    y[0, 3] += 1.0  # change the last token: the first position must see it
    with torch.no_grad():
        assert not torch.allclose(conn(x)[0][0, 0], conn(y)[0][0, 0])


def test_connector_default_is_the_papers_16_layers_to_sdxl_dims():
    cfg = ConnectorConfig()
    assert (cfg.layers, cfg.context_dim, cfg.pooled_dim, cfg.in_dim) == (16, 2048, 1280, 4096)


def test_conditioning_shapes_weights_and_negative(encoder):
    torch.manual_seed(0)
    cond = MumuConditioner(encoder, MumuConnector(TINY.connector)).eval()
    p = InterleavedPrompt.parse("a <image> dog", [red()], tokens_per_image=4)
    p_half = InterleavedPrompt.parse("a <image> dog", [red()], tokens_per_image=4, weights=[0.5])
    with torch.no_grad():
        c, ch = cond.encode([p]), cond.encode([p_half])
    assert c.context.shape[-1] == TINY.connector.context_dim and c.pooled.shape == (
        1,
        TINY.connector.pooled_dim,
    )
    image_pos = encoder.encode([p]).image_index[0] >= 0
    torch.testing.assert_close(ch.context[0, image_pos], 0.5 * c.context[0, image_pos])
    torch.testing.assert_close(ch.context[0, ~image_pos], c.context[0, ~image_pos])
    neg = c.negative()
    assert neg.context.shape == c.context.shape and not neg.context.any() and not neg.pooled.any()
    keep = c.negative("keep")
    assert not keep.context.any() and torch.equal(keep.pooled, c.pooled)


def test_dropout_is_the_negative_for_dropped_samples_only():
    ctx, pooled = torch.randn(3, 4, 8), torch.randn(3, 6)
    from mumu_core.conditioning import SDXLConditioning

    c = SDXLConditioning(ctx, pooled, torch.ones(3, 4, dtype=torch.bool))
    d = drop_conditioning(c, torch.tensor([False, True, False]))
    assert torch.equal(d.context[0], ctx[0]) and not d.context[1].any() and not d.pooled[1].any()
    assert torch.equal(d.pooled[2], pooled[2])
    neg = c.negative()
    assert torch.equal(d.context[1], neg.context[1]) and torch.equal(d.pooled[1], neg.pooled[1])


def test_connector_rejects_wrong_vlm_width(encoder):
    with pytest.raises(ValueError, match="another VLM"):
        MumuConditioner(encoder, MumuConnector(ConnectorConfig(in_dim=4096, width=32, layers=1, heads=2)))


def test_add_time_ids_layout():
    ids = add_time_ids((768, 1024), (0, 16), (1024, 1024), batch=2)
    assert ids.tolist() == [[768, 1024, 0, 16, 1024, 1024]] * 2

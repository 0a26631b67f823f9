"""The train-time data rules, each checked on a seeded sample (exact counts are reproducible; the
proportions must sit within 4 standard deviations of the configured rate)."""

from __future__ import annotations

import math
import random
from collections import Counter
from itertools import islice

import pytest
import torch
from PIL import Image

from mumu_core.prompt import ImageRef, prepare_image
from train.config import DataConfig
from train.data import (
    AUGMENTATIONS,
    CONTROL_PHRASES,
    Rules,
    Sample,
    ShardStream,
    augment,
    build_prompt,
    choose_control,
    choose_objects,
    crop_member,
    make_example,
    maybe_augment,
    sample_rng,
    target_crop,
)

N = 4000


def within(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1


def colour(i: int, size=(20, 30)) -> Image.Image:
    return Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))


def record(n_obj: int = 5, persons=(0,), controls=("canny", "depth", "sketch"), dropped: int = 1):
    """A caption 'w0 w1 w2 ...' with one kept object per word; persons have head crops."""
    words = [f"w{i}" for i in range(n_obj + dropped)]
    caption = " ".join(words)
    objs, members, pos = [], {}, 0
    for i, w in enumerate(words):
        start = caption.index(w, pos)
        pos = start + len(w)
        kept = i < n_obj
        o = {
            "phrase": w,
            "span": [start, start + len(w)],
            "box": [0, 0, 5, 5],
            "score": 0.9,
            "label": w,
            "is_person": i in persons,
            "crop": f"crop{i}.png" if kept else None,
            "head_crop": f"head{i}.png" if (kept and i in persons) else None,
            "head_box": None,
            "kept": kept,
            "reason": None if kept else "too_small",
        }
        if kept:
            members[f"crop{i}.png"] = colour(i)
            if i in persons:
                members[f"head{i}.png"] = colour(100 + i, (10, 10))
        objs.append(o)
    ctrl = {c: f"{c}.png" for c in controls}
    for c in controls:
        members[f"{c}.png"] = colour(200, (64, 48))
    rec = {"key": "k", "caption": caption, "width": 64, "height": 48, "objects": objs, "controls": ctrl}
    return Sample("k", rec, colour(7, (64, 48)), members)


def rules(stage=1, **kw) -> Rules:
    base = dict(stage=stage, tokens=4 if stage == 1 else 16, resolution=32)
    base.update(kw)
    return Rules(**base)


def test_rules_from_config_token_targets():
    assert Rules.from_config(DataConfig(stage=1), 324, 1024).tokens == 324
    assert Rules.from_config(DataConfig(stage=2), 324, 1024).tokens == 1296  # the paper's two numbers
    assert Rules.from_config(DataConfig(stage=1, tokens_per_image=16), 16, 24).tokens == 16
    from train.data import DataError

    with pytest.raises(DataError, match="square number"):
        Rules.from_config(DataConfig(tokens_per_image=300), 324, 1024)


def test_stage1_up_to_three_crops_in_caption_order_never_dropped_objects():
    s = record(n_obj=5)
    counts = Counter()
    for i in range(N):
        chosen = choose_objects(s.record, s.members, rules(), random.Random(i))
        assert len(chosen) == 3 and chosen == sorted(chosen)
        assert 5 not in chosen  # the dropped object
        counts.update(chosen)
    for k in range(5):  # uniform subsets: each object in 3/5 of the prompts
        assert within(counts[k], N, 3 / 5), counts
    small = record(n_obj=2)
    assert choose_objects(small.record, small.members, rules(), random.Random(0)) == [0, 1]


def test_stage2_one_person_crop():
    s = record(n_obj=4, persons=(1, 3))
    counts = Counter()
    for i in range(N):
        chosen = choose_objects(s.record, s.members, rules(2), random.Random(i))
        assert len(chosen) == 1
        counts.update(chosen)
    assert set(counts) == {1, 3} and within(counts[1], N, 0.5)
    no_person = record(n_obj=3, persons=())
    assert make_example(no_person, rules(2), random.Random(0)) is None


def test_head_crop_replaces_70_percent_of_person_crops():
    s = record(n_obj=2, persons=(0,))
    objs = s.record["objects"]
    r = rules(head_prob=0.7)
    heads = sum(crop_member(objs[0], s.members, r, random.Random(i)) == "head0.png" for i in range(N))
    assert within(heads, N, 0.7)
    assert all(crop_member(objs[1], s.members, r, random.Random(i)) == "crop1.png" for i in range(200))
    # Reproducible: the same seeds give the same count.
    again = sum(crop_member(objs[0], s.members, r, random.Random(i)) == "head0.png" for i in range(N))
    assert again == heads


def test_control_30_percent_stage1_only_and_room_for_it():
    s = record(n_obj=2)
    kinds = [choose_control(s.record, s.members, 2, rules(), random.Random(i)) for i in range(N)]
    chosen = [k for k in kinds if k]
    assert within(len(chosen), N, 0.3)
    for k in ("canny", "depth", "sketch"):
        assert within(chosen.count(k), len(chosen), 1 / 3)
    assert all(choose_control(s.record, s.members, 2, rules(2), random.Random(i)) is None for i in range(300))
    # 4 images at most: with 4 crops already there is no room.
    assert all(choose_control(s.record, s.members, 4, rules(), random.Random(i)) is None for i in range(300))
    bare = record(n_obj=2, controls=())
    assert all(
        choose_control(bare.record, bare.members, 2, rules(), random.Random(i)) is None for i in range(300)
    )


def test_control_appended_at_the_end_with_its_phrase():
    s = record(n_obj=1, controls=("canny",))
    r = rules(control_prob=1.0, augment_prob=0.0)
    ex = make_example(s, r, random.Random(0))
    assert ex.prompt.to_text() == "<image1>w0 w1" + CONTROL_PHRASES["canny"] + "<image2>"
    assert len(ex.prompt.images) <= r.max_images


def test_augment_20_percent_one_operation_each():
    img = colour(3, (40, 30))
    r = rules(augment_prob=0.2)
    changed = sum(maybe_augment(img, r, random.Random(i)) is not img for i in range(N))
    assert within(changed, N, 0.2)
    ops = Counter(random.Random(i).choice(AUGMENTATIONS) for i in range(N))
    assert all(within(ops[o], N, 0.25) for o in AUGMENTATIONS)
    grad = Image.linear_gradient("L").resize((40, 30)).convert("RGB")
    flipped = augment(grad, random.Random(0), "flip")
    assert flipped.getpixel((0, 0)) == grad.getpixel((39, 0))
    gray = augment(colour(5), random.Random(0), "grayscale")
    r_, g_, b_ = gray.getpixel((0, 0))
    assert r_ == g_ == b_
    cropped = augment(grad, random.Random(0), "crop")
    assert 32 <= cropped.width <= 40 and 24 <= cropped.height <= 30
    noisy = augment(colour(5), random.Random(0), "noise")
    assert noisy.size == (20, 30) and noisy.tobytes() != colour(5).tobytes()


def test_prompt_places_each_crop_before_its_words_and_tokens_are_the_target():
    a, b = colour(1, (3, 5)), colour(2, (300, 100))
    p = build_prompt("a man and his dog", [(14, b, 324), (2, a, 324)], None)
    assert p.to_text() == "a <image1>man and his <image2>dog"
    assert [r.tokens for r in p.images] == [324, 324]
    # Crops are padded square with black and resized to the target's side, upsampled when small.
    assert prepare_image(a, 324).size == (252, 252) and prepare_image(b, 1296).size == (504, 504)
    assert ImageRef(a, 324).tokens == 324


def test_target_crop_and_micro_conditioning():
    img = Image.linear_gradient("L").resize((64, 48)).convert("RGB")
    x, ids = target_crop(img, 32, "center", random.Random(0))
    assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1
    # resized to 43x32: centre crop starts at left (43-32)//2 = 5
    assert ids == (48, 64, 0, 5, 32, 32)
    lefts = {target_crop(img, 32, "random", random.Random(i))[1][3] for i in range(200)}
    assert lefts == set(range(0, 12))


def test_make_example_is_deterministic_per_seed_epoch_key():
    s = record(n_obj=5)
    r = rules()
    a = make_example(s, r, sample_rng(0, 0, "k"))
    b = make_example(s, r, sample_rng(0, 0, "k"))
    c = make_example(s, r, sample_rng(0, 1, "k"))
    assert a.prompt.to_text() == b.prompt.to_text() and torch.equal(a.target, b.target)
    assert a.time_ids == b.time_ids
    assert (a.prompt.to_text(), a.time_ids) != (c.prompt.to_text(), c.time_ids) or not torch.equal(
        a.target, c.target
    )


def test_stream_split_and_resume(shards):
    r = Rules.from_config(DataConfig(tokens_per_image=4, resolution=32), 4, 32)
    per_rank = [[e.key for e in islice(iter(ShardStream(shards, r, 0, k, 2)), 4)] for k in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])  # each rank its own shard in an epoch
    full = list(islice(iter(ShardStream(shards, r, 0, 0, 1)), 6))
    resumed = list(islice(iter(ShardStream(shards, r, 0, 0, 1, position=full[2].position)), 3))
    assert [e.key for e in resumed] == [e.key for e in full[3:6]]
    assert all(torch.equal(x.target, y.target) for x, y in zip(resumed, full[3:6]))
    assert full[-1].position[0] >= 0


def test_missing_shards_error(tmp_path):
    from train.data import DataError, expand_shards

    with pytest.raises(DataError, match="matches no file"):
        expand_shards([str(tmp_path / "nope-*.tar")])


def test_image_drop_keeps_the_words_and_can_leave_a_text_only_prompt():
    s = record(n_obj=1, persons=(), controls=())
    kept = text_only = 0
    for i in range(N):
        ex = make_example(s, rules(image_drop_prob=0.3, control_prob=0.0), random.Random(i))
        assert ex is not None and "w0" in ex.prompt.to_text()  # the caption always stays whole
        if ex.prompt.images:
            kept += 1
        else:
            text_only += 1
            assert ex.prompt.to_text() == s.record["caption"]
    assert within(text_only, N, 0.3), text_only
    # The default keeps every chosen crop; a record with no usable crop is still skipped.
    assert all(make_example(s, rules(control_prob=0.0), random.Random(i)).prompt.images for i in range(50))
    empty = record(n_obj=0, persons=(), controls=())
    assert make_example(empty, rules(image_drop_prob=0.3), random.Random(0)) is None


def test_tokens_choices_drawn_per_image():
    s = record(n_obj=3, persons=(), controls=())
    r = Rules.from_config(DataConfig(tokens_per_image=16, tokens_choices=[1, 4, 16]), 16, 24)
    seen = Counter()
    for i in range(300):
        ex = make_example(s, r, random.Random(i))
        seen.update(ref.tokens for ref in ex.prompt.images)
    assert set(seen) == {1, 4, 16} and all(within(seen[t], 900, 1 / 3) for t in (1, 4, 16)), seen
    from train.data import DataError

    with pytest.raises(DataError, match="tokens_choices"):
        Rules.from_config(DataConfig(tokens_choices=[5]), 16, 24)
    with pytest.raises(DataError, match="image_drop_prob"):
        Rules.from_config(DataConfig(image_drop_prob=1.0), 16, 24)


def test_min_snr_weights_match_the_formula():
    from diffusers import DDIMScheduler

    from train.loop import min_snr_weights

    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True)
    t = torch.tensor([0, 250, 500, 750, 999])
    a = sched.alphas_cumprod[t].double()
    snr = a / (1 - a)
    v = min_snr_weights(sched, t, 5.0, "v_prediction")
    assert torch.allclose(v.double(), snr.clamp(max=5) / (snr + 1), atol=1e-6)
    assert v[-1] == 0  # zero terminal SNR: the pure-noise step carries no weight
    assert v[0] < 0.01 and 0.3 < v.max() <= 1  # almost-clean steps are down-weighted too
    eps = min_snr_weights(sched, t[:-1], 5.0, "epsilon")
    assert torch.allclose(eps.double(), snr[:-1].clamp(max=5) / snr[:-1], atol=1e-6)
    # A high-noise floor of 1: v keeps the low-noise cap and gets full weight where min-SNR suppresses it.
    full = min_snr_weights(sched, t, 5.0, "v_prediction", high_noise_floor=1.0)
    assert torch.allclose(full.double(), (5 / (snr + 1)).clamp(max=1), atol=1e-6)
    assert full[-1] == 1 and full[-2] == 1 and torch.allclose(full[0], v[0], rtol=1e-3)
    # A floor in between lifts only the steps min-SNR weights below it.
    part = min_snr_weights(sched, t, 5.0, "v_prediction", high_noise_floor=0.25)
    assert torch.allclose(part.double(), torch.maximum(snr.clamp(max=5) / (snr + 1), 0.25 * full.double()))
    assert part[-1] == 0.25 and torch.equal(part[0], v[0]) and (v <= part).all() and (part <= full).all()
    assert torch.equal(min_snr_weights(sched, t[:-1], 5.0, "epsilon", high_noise_floor=1.0), eps)


def test_weighted_timesteps_follow_the_weights_stratified():
    from train.loop import weighted_timesteps

    weights = torch.zeros(1000)
    weights[100:200], weights[600:700] = 1.0, 3.0  # a quarter of the mass on 100-199, the rest on 600-699
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([weighted_timesteps(weights, 8, gen) for _ in range(500)])
    assert draws.shape == (500, 8) and draws.dtype == torch.int64
    assert ((100 <= draws) & (draws < 200) | (600 <= draws) & (draws < 700)).all()  # never a zero weight
    # Stratified: every batch of 8 puts exactly 2 draws on the first block and 6 on the second, and in
    # order, so a batch covers the mass evenly rather than by chance.
    assert ((draws < 200).sum(1) == 2).all() and (draws.diff(dim=1) >= 0).all()
    counts = torch.bincount(draws.flatten(), minlength=1000).float()
    assert counts[100:200].std() / counts[100:200].mean() < 0.3  # uniform within a block


def test_weighted_sampling_keeps_the_expected_loss():
    """Drawn in proportion to the weights and scaled by their mean, the loss has the expectation of
    uniform timesteps times their weights (what training_loss returns under "weighted")."""
    from diffusers import DDIMScheduler

    from train.loop import min_snr_weights, weighted_timesteps

    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True)
    weights = min_snr_weights(sched, torch.arange(1000), 5.0, "v_prediction", high_noise_floor=0.25)
    loss_at = 2 + torch.sin(torch.arange(1000) / 90.0)  # any per-timestep loss
    gen = torch.Generator().manual_seed(0)
    t = torch.cat([weighted_timesteps(weights, 32, gen) for _ in range(300)])
    assert (loss_at[t].mean() * weights.mean()).item() == pytest.approx(
        (weights * loss_at).mean().item(), rel=2e-3
    )


def test_min_snr_options_are_checked():
    from train.config import ConfigError, TrainConfig

    cfg = TrainConfig()
    cfg.model.vlm, cfg.model.sdxl, cfg.data.shards = "v", "s", ["d.tar"]
    cfg.diffusion.snr_high_noise_floor = 0.5
    cfg.diffusion.timestep_sampling = "weighted"
    with pytest.raises(ConfigError, match="snr_high_noise_floor needs diffusion.snr_gamma") as e:
        cfg.validate()
    assert "timestep_sampling=weighted needs diffusion.snr_gamma" in str(e.value)
    cfg.diffusion.snr_gamma = -1
    with pytest.raises(ConfigError, match="snr_gamma=-1 must be >= 0"):
        cfg.validate()
    cfg.diffusion.snr_gamma = 5
    cfg.diffusion.snr_high_noise_floor = 1.5
    with pytest.raises(ConfigError, match="snr_high_noise_floor=1.5 must be in"):
        cfg.validate()
    cfg.diffusion.snr_high_noise_floor = 0.5
    cfg.validate()


@pytest.mark.parametrize("sampling", ["uniform", "weighted"])
def test_training_loss_weights_each_sample_by_its_timestep(sampling):
    """training_loss on a stand-in model that predicts 0: each sample's loss is the mean square of its
    target, weighted by min-SNR (uniform) or drawn in proportion to it and scaled by the mean (weighted)."""
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    from mumu_core.pixel_vae import PixelSpaceVAE
    from train.config import TrainConfig
    from train.data import Batch
    from train.loop import min_snr_weights, training_loss

    sched = DDIMScheduler(
        beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True, prediction_type="v_prediction"
    )
    seen = {}

    def model(kind, *, noisy, timesteps, **_):
        seen["t"] = timesteps
        return torch.zeros_like(noisy)

    cfg = TrainConfig()
    cfg.diffusion.snr_gamma, cfg.diffusion.snr_high_noise_floor = 5.0, 0.25
    cfg.diffusion.timestep_sampling = sampling
    built = SimpleNamespace(vae=PixelSpaceVAE(), scheduler=sched, model=model)
    targets = torch.rand(64, 3, 8, 8) * 2 - 1
    batch = Batch(prompts=[None] * 64, targets=targets, time_ids=torch.zeros(64, 6), position=(0, 0))
    gen = torch.Generator().manual_seed(0)
    loss = training_loss(built, batch, torch.device("cpu"), gen, cfg, "v_prediction")

    t = seen["t"]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(targets.shape, generator=gen)  # the first draw, as in training_loss
    velocity = sched.get_velocity(targets, noise, t)
    per_sample = velocity.pow(2).flatten(1).mean(1)
    weights = min_snr_weights(sched, torch.arange(1000), 5.0, "v_prediction", 0.25)
    if sampling == "weighted":
        want = per_sample.mean() * weights.mean()
        # Stratified over the weights' mass: one draw from each 64th, in order.
        cdf = (weights.double().cumsum(0) / weights.double().sum())[t]
        assert (t.diff() >= 0).all() and ((cdf * 64).ceil() >= torch.arange(1, 65)).all()
    else:
        want = (per_sample * weights[t]).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)

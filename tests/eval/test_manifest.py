import json

import pytest

from mumu_core.eval.manifest import (
    DREAMBENCH_SUBJECTS,
    EvalCase,
    Manifest,
    ManifestError,
    dreambench_suite,
    load_manifest,
    load_suite,
    plan_suite,
    save_manifest,
    save_suite,
    write_generate_script,
)


def test_phrases_are_the_word_after_each_placeholder(tmp_path):
    c = EvalCase("c", "a <image> man and his <image> dog.", (tmp_path / "m.png", tmp_path / "d.png"))
    assert c.object_phrases() == ["man", "dog"]
    assert c.plain_text == "a man and his dog."


def test_numbered_placeholders_map_phrases_to_their_reference(tmp_path):
    # <image2> comes first in the text but is the second reference.
    c = EvalCase("c", "a <image2> Dog next to a <image1> man", (tmp_path / "m.png", tmp_path / "d.png"))
    assert c.object_phrases() == ["man", "dog"]
    assert c.reference_order() == [1, 0]


def test_explicit_phrases_override(tmp_path):
    c = EvalCase("c", "a <image> teddy bear", (tmp_path / "t.png",), phrases=("teddy bear",))
    assert c.object_phrases() == ["teddy bear"]


def test_missing_word_after_placeholder_is_a_clear_error(tmp_path):
    c = EvalCase("c", "a photo of <image>, outdoors", (tmp_path / "a.png",))
    with pytest.raises(ManifestError, match="phrases"):
        c.object_phrases()


@pytest.mark.parametrize(
    "prompt,n,match",
    [
        ("a <image> man and <image2> dog", 2, "mixes"),
        ("a <image> man", 2, "not used"),
        ("a <image> man and <image> dog", 1, "placeholders"),
    ],
)
def test_bad_prompts_are_rejected_at_load(tmp_path, prompt, n, match):
    with pytest.raises(ManifestError, match=match):
        EvalCase("bad", prompt, tuple(tmp_path / f"{i}.png" for i in range(n)))


def test_field_count_mismatches_are_rejected(tmp_path):
    refs = (tmp_path / "a.png",)
    with pytest.raises(ManifestError, match="phrases"):
        EvalCase("c", "a <image> man", refs, phrases=("man", "dog"))
    with pytest.raises(ManifestError, match="subject_images"):
        EvalCase("c", "a <image> man", refs, subject_images=((), ()))
    with pytest.raises(ManifestError, match="seeds"):
        EvalCase("c", "a <image> man", refs, generated=(tmp_path / "g.png",), seeds=(1, 2))
    with pytest.raises(ManifestError, match="twice"):
        Manifest((EvalCase("c", "x"), EvalCase("c", "y")))


def test_manifest_round_trip_with_relative_paths(tmp_path):
    m = Manifest(
        (
            EvalCase(
                "c0",
                "a <image> man and his <image> dog",
                (tmp_path / "refs" / "man.png", tmp_path / "refs" / "dog.png"),
                (tmp_path / "out" / "c0_s0.png", tmp_path / "out" / "c0_s1.png"),
                phrases=("man", "dog"),
                subject_images=((tmp_path / "refs" / "man.png",), (tmp_path / "refs" / "dog.png",)),
                group="people",
                seeds=(0, 1),
            ),
            EvalCase("c1", "a red car"),
        ),
        name="demo",
    )
    path = save_manifest(m, tmp_path / "manifest.json")
    raw = json.loads(path.read_text())
    assert raw["cases"][0]["references"] == ["refs/man.png", "refs/dog.png"]  # relative to the file
    back = load_manifest(path)
    assert back == m
    # Moving the folder keeps the manifest valid: paths resolve against its new location.
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    tmp_path.rename(moved)
    assert load_manifest(moved / "manifest.json").cases[0].references[0] == moved / "refs" / "man.png"


def test_load_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.json")
    p = tmp_path / "m.json"
    p.write_text('{"format": "something-else"}')
    with pytest.raises(ManifestError, match="mumu-eval-manifest"):
        load_manifest(p)
    p.write_text(
        json.dumps(
            {"format": "mumu-eval-manifest", "version": 1, "cases": [{"id": "a", "prompt": "x", "oops": 1}]}
        )
    )
    with pytest.raises(ManifestError, match="oops"):
        load_manifest(p)
    p.write_text(
        json.dumps(
            {
                "format": "mumu-eval-manifest",
                "version": 1,
                "cases": [{"id": "a", "prompt": "<image> x", "references": "r.png"}],
            }
        )
    )
    with pytest.raises(ManifestError, match="list"):
        load_manifest(p)
    case = {"id": "a", "prompt": "<image> man", "references": ["r.png"], "phrases": "man"}
    p.write_text(json.dumps({"format": "mumu-eval-manifest", "version": 1, "cases": [case]}))
    with pytest.raises(ManifestError, match="list of strs"):
        load_manifest(p)


def _fake_dreambench(root):
    for sid in DREAMBENCH_SUBJECTS:
        (root / sid).mkdir(parents=True)
        for i in range(2):
            (root / sid / f"{i:02d}.jpg").write_bytes(b"")  # planning never opens the photos
    return root


def test_dreambench_suite_plan_and_script(tmp_path):
    suite = dreambench_suite(
        _fake_dreambench(tmp_path / "dataset"), seeds=(0, 1), generate_args=("--steps", "30")
    )
    assert len(suite.subjects) == 30 and sum(s.live for s in suite.subjects) == 9
    spath = save_suite(suite, tmp_path / "suite.json")
    assert load_suite(spath) == suite

    manifest, jobs = plan_suite(suite, tmp_path / "run" / "generated")
    assert len(manifest.cases) == 750  # 30 subjects x 25 prompts, DreamBench's protocol
    assert len(jobs) == 1500
    bear = next(c for c in manifest.cases if c.id == "bear_plushie-00")
    assert bear.prompt == "a <image> stuffed animal in the jungle"
    assert bear.object_phrases() == ["stuffed animal"]
    assert bear.references == (tmp_path / "dataset" / "bear_plushie" / "00.jpg",)
    assert len(bear.subject_images[0]) == 2 and bear.group == "bear_plushie" and bear.seeds == (0, 1)
    dog = [c for c in manifest.cases if c.group == "dog"]
    assert any("santa hat" in c.prompt for c in dog)  # live subjects get the live prompt list
    job = jobs[100]  # backpack and backpack_dog come first: 2 x 25 prompts x 2 seeds
    assert job.out == bear.generated[0]
    assert job.argv == (
        "--prompt",
        bear.prompt,
        "--image",
        str(bear.references[0]),
        "--seed",
        "0",
        "--steps",
        "30",
    )

    mpath = save_manifest(manifest, tmp_path / "run" / "manifest.json")
    assert load_manifest(mpath) == manifest
    script = write_generate_script(jobs, tmp_path / "run" / "generate.sh", extra_args=("--vlm", "my vlm"))
    lines = script.read_text().splitlines()
    assert sum("python -m mumu_core generate" in line for line in lines) == 1500
    assert "--steps 30 --vlm 'my vlm' --out" in lines[4 + 100]
    assert lines[4].startswith("[ -f ")  # reruns skip images that exist


def test_dreambench_suite_needs_every_subject(tmp_path):
    root = _fake_dreambench(tmp_path / "dataset")
    for f in (root / "teapot").iterdir():
        f.unlink()
    with pytest.raises(ManifestError, match="teapot"):
        dreambench_suite(root)
    with pytest.raises(ManifestError, match="does not exist"):
        dreambench_suite(tmp_path / "missing")


def test_suite_templates_need_both_slots(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0.png").write_bytes(b"")
    data = {"format": "mumu-eval-suite", "subjects": [{"id": "a", "class": "cat", "images": "a"}],
            "prompts": ["a cat in the snow"]}  # fmt: skip
    (tmp_path / "s.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"\{0\}"):
        load_suite(tmp_path / "s.json")

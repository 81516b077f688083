"""The shapes world: prompts and split, renders, and a pixel-only scorer measured on clean, wrong and JPEG renders."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from shapes import scorer, world


ALL = world.all_prompts(1) + world.all_prompts(2)


def _prompts(n, seed):
    """n prompts covering every prompt (cycled), in a seeded order."""
    order = np.random.default_rng(seed).permutation(len(ALL))
    return [ALL[order[i % len(ALL)]] for i in range(n)]


# ---------------------------------------------------------------------------------------------------- prompts


def test_prompt_counts_and_roundtrip():
    assert len(world.all_prompts(1)) == 12
    assert len(world.all_prompts(2)) == 12 * 11 * 4
    texts = [str(p) for p in ALL]
    assert len(set(texts)) == len(texts)
    for p, t in zip(ALL, texts):
        assert world.parse_prompt(t) == p
        assert str(world.parse_prompt(t)) == t
    assert str(world.parse_prompt("a red circle")) == "a red circle"
    p = world.parse_prompt("  A Blue square   left of a yellow TRIANGLE ")
    assert p == world.Prompt((world.SceneObject("blue", "square"), world.SceneObject("yellow", "triangle")), "left of")
    assert str(p) == "a blue square left of a yellow triangle"


@pytest.mark.parametrize(
    "text",
    ["", "a purple circle", "a red hexagon", "red circle", "a red circle near a blue square", "a red circle left of"],
)
def test_parse_rejects_bad_prompts(text):
    with pytest.raises(ValueError, match="shapes-world prompt"):
        world.parse_prompt(text)


def test_two_identical_objects_are_rejected():
    with pytest.raises(ValueError, match="a red circle above a red circle"):
        world.parse_prompt("a red circle above a red circle")
    with pytest.raises(ValueError):
        world.Prompt((world.SceneObject("red", "circle"), world.SceneObject("red", "circle")), "above")
    with pytest.raises(ValueError):
        world.Prompt((world.SceneObject("red", "circle"),), "above")
    with pytest.raises(ValueError):
        world.SceneObject("red", "hexagon")


def test_heldout_split():
    held, train = world.heldout_prompts(), world.train_prompts()
    held_s, train_s = {str(p) for p in held}, {str(p) for p in train}
    assert not held_s & train_s
    assert held_s | train_s == {str(p) for p in ALL}
    assert all(len(p.objects) == 2 for p in held)
    assert len(held) == 96 and len(train) == 12 + 432
    assert 0.15 <= len(held) / len(world.all_prompts(2)) <= 0.20
    assert world.train_prompts(1) == world.all_prompts(1)
    assert world.heldout_prompts() == held  # deterministic
    # the rule is about the unordered pair: the mirrored statement is on the same side, all relations alike
    for p in world.all_prompts(2):
        a, b = p.objects
        mirrored = world.Prompt((b, a), world.OPPOSITE[p.relation])
        assert world.is_heldout(mirrored) == world.is_heldout(p)
        for rel in world.RELATIONS:
            assert world.is_heldout(world.Prompt((a, b), rel)) == world.is_heldout(p)
    # every object and every relation still occurs in training
    train2 = world.train_prompts(2)
    assert {o for p in train2 for o in p.objects} == set(world.all_objects())
    assert {p.relation for p in train2} == set(world.RELATIONS)
    assert world.is_heldout("a red circle left of a blue square") and world.is_heldout(
        "a green triangle below a yellow circle"
    )
    assert not world.is_heldout("a red circle left of a blue circle")  # same shape: trained
    assert not world.is_heldout("a red circle left of a green square")  # other colour pair: trained


# -------------------------------------------------------------------------------------------------- rendering


def test_render_is_deterministic_and_well_formed():
    for p in [ALL[0], ALL[100], ALL[-1]]:
        a = np.asarray(world.render(p, np.random.default_rng(7)))
        b = np.asarray(world.render(p, np.random.default_rng(7)))
        c = np.asarray(world.render(p, np.random.default_rng(8)))
        assert a.shape == (32, 32, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b) and not np.array_equal(a, c)
        assert np.array_equal(np.asarray(world.render(str(p), 7)), a)  # seeds and text prompts work too
        assert (a[0] == 255).all() and (a[:, 0] == 255).all()  # margin: white border
    for kind in world.WRONG_KINDS:
        p = ALL[100]
        x = np.asarray(world.render_wrong(p, np.random.default_rng(3), kind))
        assert np.array_equal(x, np.asarray(world.render_wrong(p, np.random.default_rng(3), kind)))


def test_layout_respects_relation_sizes_and_separation():
    g = np.random.default_rng(0)
    for p in _prompts(2000, seed=1):
        lay = world.sample_layout(p, g)
        assert [q.obj for q in lay] == list(p.objects)
        for q in lay:
            assert world.MIN_EXTENT <= q.size <= world.MAX_EXTENT
            x0, y0, x1, y1 = q.box()
            assert x0 >= world.MARGIN - 1e-9 and y0 >= world.MARGIN - 1e-9
            assert x1 <= 32 - world.MARGIN + 1e-9 and y1 <= 32 - world.MARGIN + 1e-9
        if len(lay) == 2:
            first, second = lay
            axis, sign = world.RELATIONS[p.relation]
            d = (first.cx - second.cx, first.cy - second.cy)
            along, across = d[axis] * sign, abs(d[1 - axis])
            assert along >= max(8.0, (first.size + second.size) / 2 + world.GAP) - 1e-9
            assert across <= along / 2 + 1e-9
            assert world._boxes_apart(first, second)


def test_extent_of_drawn_objects():
    g = np.random.default_rng(4)
    for p in world.all_prompts(1):
        for _ in range(5):
            (q,) = world.sample_layout(p, g)
            mask = np.asarray(world.draw([q])).astype(int).sum(-1) < 3 * 255 - 60
            ys, xs = np.nonzero(mask)
            for extent in (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1):  # partly covered pixels count
                assert q.size - 1.5 <= extent <= q.size + 2


# ---------------------------------------------------------------------------------------------------- scoring


def _rate(results):
    return sum(results) / len(results)


def test_clean_renders_pass():
    prompts = _prompts(1200, seed=2)
    g = np.random.default_rng(2)
    results = scorer.score_many([world.render(p, g) for p in prompts], prompts)
    rate = scorer.pass_rate(results)
    assert rate >= 0.99, rate
    assert all(r.score == 1.0 for r in results if r.passed)
    r = results[0]
    assert 0.0 <= r.score <= 1.0 and set(r.atoms) >= {"no extra objects"}


def test_jpeg_renders_pass():
    prompts = _prompts(600, seed=3)
    g = np.random.default_rng(3)
    rate = scorer.pass_rate(scorer.score_many([world.jpeg(world.render(p, g), quality=90) for p in prompts], prompts))
    assert rate >= 0.97, rate


def test_blurred_and_off_colour_renders_pass():
    """Stand-ins for generated images: slightly blurred, colours shifted, other sizes."""
    prompts = _prompts(300, seed=5)
    g = np.random.default_rng(5)
    images = []
    for i, p in enumerate(prompts):
        im = world.render(p, g).filter(ImageFilter.GaussianBlur(0.7))
        arr = np.asarray(im).astype(np.float64) * g.uniform(0.9, 1.0, size=3) + g.normal(0, 4, size=(32, 32, 3))
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(arr).resize((64, 64), Image.Resampling.BICUBIC) if i % 3 == 0 else arr)
    rate = scorer.pass_rate(scorer.score_many(images, prompts))
    assert rate >= 0.95, rate


@pytest.mark.parametrize("kind", world.WRONG_KINDS)
def test_wrong_renders_fail_the_right_atom(kind):
    prompts = [p for p in _prompts(300, seed=6) if kind != "relation" or len(p.objects) == 2][:150]
    g = np.random.default_rng(6)
    hits, others_ok = [], []
    for p in prompts:
        target = int(g.integers(len(p.objects)))
        r = scorer.score(world.render_wrong(p, g, kind, target=target), p)
        if kind in ("color", "shape", "missing"):
            hits.append(not r.object_present[target])
            rest = [ok for i, ok in enumerate(r.object_present) if i != target] + [r.no_extra]
        elif kind == "relation":
            hits.append(r.relation is False)
            rest = list(r.object_present) + [r.no_extra]
        else:
            hits.append(not r.no_extra)
            rest = list(r.object_present) + ([r.relation] if r.relation is not None else [])
        others_ok.append(all(rest))
        assert not (hits[-1] and r.passed)
    assert _rate(hits) >= 0.95, (kind, _rate(hits))
    assert _rate(others_ok) >= 0.95, (kind, _rate(others_ok))  # the mistake is controlled: the rest holds


def test_score_atoms_and_inputs():
    p = world.parse_prompt("a blue square left of a yellow triangle")
    im = world.render(p, 0)
    r = scorer.score(im, str(p))
    assert r.passed and r.score == 1.0
    assert list(r.atoms) == ["a blue square", "a yellow triangle", "relation: left of", "no extra objects"]
    arr = np.asarray(im)
    assert scorer.score(arr, p).passed  # uint8 HWC
    assert scorer.score(arr.astype(np.float32) / 255.0, p).passed  # float HWC in [0, 1]
    assert scorer.score(arr.transpose(2, 0, 1).astype(np.float32) / 255.0, p).passed  # float CHW
    blank = scorer.score(Image.new("RGB", (32, 32), "white"), p)
    assert blank.object_present == (False, False) and blank.relation is False and blank.no_extra
    assert blank.score == 0.25 and not blank.passed
    single = scorer.score(world.render("a green circle", 1), "a green circle")
    assert single.relation is None and list(single.atoms) == ["a green circle", "no extra objects"]
    with pytest.raises(ValueError):
        scorer.score_many([im], [p, p])


def test_scorer_ignores_noise_and_foreign_colours():
    g = np.random.default_rng(9)
    p = world.parse_prompt("a red circle")
    arr = np.asarray(world.render(p, g)).copy()
    arr[2, 2] = arr[29, 29] = arr[2, 29] = (25, 25, 230)  # isolated specks are noise
    arr[28:31, 2:5] = (128, 128, 128)  # grey is no palette colour
    assert scorer.score(arr, p).passed
    dets = scorer.detect(arr)
    assert len(dets) == 1 and (dets[0].color, dets[0].shape) == ("red", "circle")


def test_transitions_count_each_samples_change_by_kind_of_failure():
    from shapes.sampling import outcome, transitions

    rng = np.random.default_rng(0)
    p = world.parse_prompt("a red circle left of a blue square")
    right, mirrored, missing, extra = (
        scorer.score(world.render(p, rng), p),
        scorer.score(world.render_wrong(p, rng, kind="relation"), p),
        scorer.score(world.render_wrong(p, rng, kind="missing"), p),
        scorer.score(world.render_wrong(p, rng, kind="extra"), p),
    )
    assert [outcome(r) for r in (right, mirrored, missing, extra)] == ["pass", "relation", "objects", "objects"]
    # two prompts' samples on the same noise, before and after: one order fixed, one object lost, one unchanged
    before = [[mirrored, right], [missing]]
    after = [[right, missing], [missing]]
    table = transitions(before, after)
    assert table["relation"]["pass"] == 1 and table["pass"]["objects"] == 1 and table["objects"]["objects"] == 1
    assert sum(n for row in table.values() for n in row.values()) == 3
    with pytest.raises(ValueError):  # the two models must have been sampled alike
        transitions(before, [[right], [missing]])


def test_failure_kind_names_what_a_sample_got_wrong():
    from shapes.sampling import FAILURE_KINDS, failure_counts, failure_kind

    g = np.random.default_rng(11)
    expected = {"color": "colour", "shape": "shape", "missing": "missing", "relation": "relation", "extra": "extra"}
    for kind, name in expected.items():
        prompts = [p for p in _prompts(200, seed=11) if kind != "relation" or len(p.objects) == 2][:80]
        got = [failure_kind(scorer.score(world.render_wrong(p, g, kind), p)) for p in prompts]
        assert _rate([k == name for k in got]) >= 0.95, (kind, got)
    # each object drawn in the other's colour: a binding failure, not two wrong objects
    two = [
        p for p in world.all_prompts(2) if len({o.color for o in p.objects}) == len({o.shape for o in p.objects}) == 2
    ]
    swapped = []
    for p in [two[i] for i in g.choice(len(two), 80, replace=False)]:
        a, b = world.sample_layout(p, g)
        image = world.draw([
            world.Placement(world.SceneObject(b.obj.color, a.obj.shape), a.cx, a.cy, a.size),
            world.Placement(world.SceneObject(a.obj.color, b.obj.shape), b.cx, b.cy, b.size),
        ])  # fmt: skip
        swapped.append(scorer.score(image, p))
    assert _rate([failure_kind(r) == "colours swapped" for r in swapped]) >= 0.95
    assert failure_kind(scorer.score(world.render(two[0], g), two[0])) == "pass"
    counts = failure_counts([swapped[:3], swapped[3:5]])
    assert list(counts) == list(FAILURE_KINDS) and sum(counts.values()) == 5

"""Bucketing algorithms: kohya vectors derived by hand, per-image references, area mode."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hookengine.data.bucketing import Bucketing
from hookengine.data.buckets import (
    BucketError,
    area_assign,
    area_bucket_resolutions,
    cover_size,
    crop_offsets,
    kohya_assign,
    kohya_bucket_resolutions,
    kohya_select_bucket_reference,
    uniforms,
)

# Worked out by hand from kohya's rule (area // width // step * step, capped at max_size,
# kept when >= min_size, both orientations, plus the square floor(sqrt(area)/step)*step).
SD15_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
    (1024, 256),
]
SDXL_HALF = [
    (256, 2048), (320, 2048), (384, 2048), (448, 2048), (512, 2048), (576, 1792), (640, 1600),
    (704, 1472), (768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024), (1088, 960),
    (1152, 896), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
    (2048, 512),
]


def test_kohya_bucket_list_sd15():
    assert kohya_bucket_resolutions(512, 256, 1024, 64) == SD15_512


def test_kohya_bucket_list_sdxl():
    expected = sorted(set(SDXL_HALF) | {(h, w) for w, h in SDXL_HALF})
    assert kohya_bucket_resolutions((1024, 1024), 256, 2048, 64) == expected


def test_kohya_bucket_list_non_square_and_small_step():
    # max_reso (512, 768): area 393216, square floor(627.06 / 64) * 64 = 576.
    buckets = kohya_bucket_resolutions((512, 768), 256, 1024, 64)
    assert (576, 576) in buckets
    assert (256, 1024) in buckets and (1024, 256) in buckets  # 393216 // 256 = 1536 -> capped 1024
    assert (640, 576) in buckets  # 393216 // 640 = 614 -> 576
    assert (768, 512) in buckets  # 393216 // 768 = 512
    # step 32: 262144 // 288 = 910 -> 896; 262144 // 480 = 546 -> 544.
    small = kohya_bucket_resolutions(512, 256, 1024, 32)
    assert (288, 896) in small and (480, 544) in small and (544, 480) in small
    assert all(w % 32 == 0 and h % 32 == 0 and w * h <= 512 * 512 for w, h in small)


@pytest.mark.parametrize(
    "size, bucket, resized",
    [
        ((1000, 1000), (512, 512), (512, 512)),
        ((512, 512), (512, 512), (512, 512)),
        # ar 1.778: errors 0.111 to (640, 384) and 0.422 to (704, 320); cover by height 384/1080.
        ((1920, 1080), (640, 384), (683, 384)),
        ((1080, 1920), (384, 640), (384, 683)),
        ((300, 1200), (256, 1024), (256, 1024)),
        # ar 0.75: (448, 576) has 0.778, error 0.028; cover by width 448/600.
        ((600, 800), (448, 576), (448, 597)),
        # tiny image is upscaled: ar 2.0 nearest (704, 320) 2.2 vs (640, 384) 1.667 -> 0.2 < 0.333.
        ((100, 50), (704, 320), (704, 352)),
    ],
)
def test_kohya_assign_vectors(size, bucket, resized):
    a = kohya_assign([size[0]], [size[1]], SD15_512)
    assert tuple(a.buckets[a.bucket[0]]) == bucket
    assert tuple(a.resized[0]) == resized
    assert kohya_select_bucket_reference(*size, SD15_512) == (bucket, resized)


def test_kohya_exact_size_beats_earlier_same_ratio_bucket():
    table = [(512, 512), (256, 256)]
    a = kohya_assign([256, 300], [256, 300], table)
    assert a.bucket.tolist() == [1, 0]  # exact size kept; otherwise the first of equal errors


@pytest.mark.parametrize(
    "size, bucket, resized",
    [
        # area 500000 > 262144: width-rounded gives 704x320 (ar 2.2), height-rounded 640x320 (2.0).
        ((1000, 500), (640, 320), (640, 320)),
        ((300, 200), (256, 192), (300, 200)),  # small: no resize, bucket rounded down
        ((512, 512), (512, 512), (512, 512)),
    ],
)
def test_kohya_no_upscale_vectors(size, bucket, resized):
    a = kohya_assign([size[0]], [size[1]], no_upscale=True, max_resolution=512, step=64)
    assert tuple(a.buckets[a.bucket[0]]) == bucket
    assert tuple(a.resized[0]) == resized


def test_kohya_no_upscale_too_small_has_no_bucket():
    a = kohya_assign([50, 0, 640], [40, 10, 640], no_upscale=True, max_resolution=512)
    assert a.bucket[0] == -1 and a.bucket[1] == -1 and a.bucket[2] >= 0


def test_kohya_vectorised_equals_per_image_reference():
    rng = np.random.default_rng(1)
    w = rng.integers(16, 4000, 3000)
    h = rng.integers(16, 4000, 3000)
    # exact bucket sizes and exact midpoints between two bucket ratios (tie rule)
    w[:17], h[:17] = np.array(SD15_512).T
    w[17], h[17] = 1080, 1160  # ar between (448,576)=.778 and (512,512)=1: not a tie, sanity
    table = SD15_512
    a = kohya_assign(w, h, table)
    for i in range(len(w)):
        ref = kohya_select_bucket_reference(int(w[i]), int(h[i]), table)
        assert (tuple(a.buckets[a.bucket[i]]), tuple(a.resized[i])) == ref, (w[i], h[i])
    b = kohya_assign(w, h, no_upscale=True, max_resolution=(768, 512), step=64)
    for i in range(len(w)):
        bucket, resized = kohya_select_bucket_reference(int(w[i]), int(h[i]), [], no_upscale=True,
                                                        max_area=768 * 512, step=64)
        assert tuple(b.resized[i]) == resized
        assert (b.bucket[i] == -1) if 0 in bucket else tuple(b.buckets[b.bucket[i]]) == bucket


def test_kohya_tie_goes_to_first_bucket():
    table = [(256, 512), (512, 256)]  # ratios 0.5 and 2.0; ar 1.25 is exactly between
    a = kohya_assign([5], [4], table)
    assert a.bucket[0] == 0
    a = kohya_assign([5], [4], table[::-1])
    assert a.bucket[0] == 0


def test_cover_size_covers_bucket():
    rng = np.random.default_rng(2)
    w, h = rng.integers(10, 3000, 2000), rng.integers(10, 3000, 2000)
    a = kohya_assign(w, h, SD15_512)
    bucket = a.buckets[a.bucket]
    assert (a.resized >= bucket).all()
    assert ((a.resized == bucket).any(axis=1)).all()  # one side matches exactly


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(max_resolution=512, min_size=1024, max_size=512, step=64), "min_size"),
        (dict(max_resolution=512, min_size=256, max_size=1024, step=60), "step=60"),
        (dict(max_resolution=512, min_size=256, max_size=1024, step=12), "multiple of 8"),
        (dict(max_resolution=1024, min_size=256, max_size=512, step=64), "max_size"),
    ],
)
def test_kohya_bad_settings_name_the_setting(kwargs, word):
    with pytest.raises(BucketError, match=word):
        kohya_bucket_resolutions(**kwargs)
    with pytest.raises(BucketError, match=word.split("=")[0]):
        Bucketing(mode="kohya", **kwargs)


def test_area_buckets_are_normalised_and_aligned():
    for resolution, align in ((512, 64), (768, 32), (1024, 16), (640, 8)):
        buckets = area_bucket_resolutions(resolution, align=align, max_aspect=3.0)
        area = resolution * resolution
        side = round(resolution / align) * align
        assert (side, side) in buckets
        for w, h in buckets:
            assert w % align == 0 and h % align == 0
            assert max(w / h, h / w) <= 3.0
            # the height is the aligned value nearest area / width (for the side iterated over)
            assert abs(w * h - area) <= max(w, h) * align / 2 or (w, h) == (side, side)
            assert (h, w) in buckets


def _nearest_log_ar(w, h, table):
    errors = [abs(math.log(bw / bh) - math.log(w / h)) for bw, bh in table]
    best = min(errors)
    # ties go to the narrower bucket (smaller ratio)
    return min((table[i] for i, e in enumerate(errors) if e == best), key=lambda b: b[0] / b[1])


def test_area_assign_matches_reference_for_one_resolution():
    rng = np.random.default_rng(3)
    w, h = rng.integers(50, 3000, 1500), rng.integers(50, 3000, 1500)
    a = area_assign(w, h, [512], align=64, max_aspect=4.0)
    table = area_bucket_resolutions(512, 64, 4.0)
    for i in range(len(w)):
        assert tuple(a.buckets[a.bucket[i]]) == _nearest_log_ar(int(w[i]), int(h[i]), table)
    bucket = a.buckets[a.bucket]
    assert (a.resized >= bucket).all()


def test_area_fit_policy_picks_largest_resolution_reached():
    w = np.array([300, 600, 800, 2000, 10])
    h = np.array([300, 500, 800, 2000, 10])
    a = area_assign(w, h, [512, 768, 1024], policy="fit")
    areas = a.buckets[a.bucket].prod(axis=1)
    expected = [512, 512, 768, 1024, 512]  # 600*500=300000 >= 512^2 but < 768^2
    for got, r in zip(areas, expected):
        assert abs(got - r * r) < 0.1 * r * r


def test_area_random_policy_follows_weights_and_epoch():
    n = 20000
    w = np.full(n, 1000)
    h = np.full(n, 1000)
    a = area_assign(w, h, [512, 1024], weights=[3, 1], policy="random", seed=5, epoch=0)
    share = (a.buckets[a.bucket][:, 0] == 512).mean()
    assert abs(share - 0.75) < 0.02
    again = area_assign(w, h, [512, 1024], weights=[3, 1], policy="random", seed=5, epoch=0)
    other = area_assign(w, h, [512, 1024], weights=[3, 1], policy="random", seed=5, epoch=1)
    assert np.array_equal(a.bucket, again.bucket)
    assert not np.array_equal(a.bucket, other.bucket)
    # one sample alone draws the same as inside the array (workers and streams agree)
    single = area_assign([1000], [1000], [512, 1024], weights=[3, 1], policy="random", seed=5, epoch=0, indices=[7])
    assert single.bucket[0] == a.bucket[7]


def test_area_bad_settings():
    with pytest.raises(BucketError, match="align"):
        area_bucket_resolutions(512, align=20)
    with pytest.raises(BucketError, match="weights"):
        area_assign([10], [10], [512, 768], weights=[1.0], policy="random")
    with pytest.raises(BucketError, match="resolution"):
        Bucketing(mode="area", resolutions=[32], align=64)


def test_crop_offsets_centre_and_random():
    resized = np.array([[683, 384], [448, 597], [512, 512]])
    bucket = np.array([[640, 384], [448, 576], [512, 512]])
    assert crop_offsets(resized, bucket).tolist() == [[21, 0], [0, 10], [0, 0]]
    rand = crop_offsets(np.repeat(resized[:1], 4000, 0), np.repeat(bucket[:1], 4000, 0), random=True, seed=1)
    assert rand[:, 0].min() == 0 and rand[:, 0].max() == 43 and (rand[:, 1] == 0).all()
    one = crop_offsets(resized[:1], bucket[:1], random=True, seed=1, indices=[123])
    assert one.tolist() == rand[123:124].tolist()


def test_uniforms_are_uniform_and_pure():
    u = uniforms(0, 0, np.arange(100000), 1)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert np.array_equal(u[5:6], uniforms(0, 0, [5], 1))
    assert not np.array_equal(u[:100], uniforms(0, 1, np.arange(100), 1))


def test_assignment_speed_one_million():
    import time

    rng = np.random.default_rng(0)
    w, h = rng.integers(64, 4000, 1_000_000), rng.integers(64, 4000, 1_000_000)
    start = time.perf_counter()
    kohya_assign(w, h, kohya_bucket_resolutions(1024, 256, 2048, 64))
    assert time.perf_counter() - start < 3.0  # ~0.3 s here; generous for a loaded machine


def test_cover_size_matches_formula():
    out = cover_size(np.array([1920]), np.array([1080]), np.array([640]), np.array([384]))
    assert out.tolist() == [[int(1920 * (384 / 1080) + 0.5), 384]]

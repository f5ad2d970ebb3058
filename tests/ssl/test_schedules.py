import numpy as np
import pytest

from essa.ssl.schedules import cosine, ssa_schedules


def test_cosine_ends_and_midpoint():
    s = cosine(1.0, 0.2, 11)
    assert s.shape == (11,)
    assert s[0] == 1.0
    assert s[-1] == pytest.approx(0.2, abs=1e-12)
    assert s[5] == pytest.approx(0.6, abs=1e-12)
    assert np.all(np.diff(s) < 0)


def test_cosine_warmup_is_linear_up_to_start():
    s = cosine(1.0, 0.0, 15, warmup_iters=4, warmup_start=0.2)
    np.testing.assert_allclose(s[:5], [0.2, 0.4, 0.6, 0.8, 1.0], atol=1e-12)
    assert s[4 + 5] == pytest.approx(0.5, abs=1e-12)  # middle of the 11 cosine steps
    assert s[-1] == pytest.approx(0.0, abs=1e-12)


def test_cosine_constant_after_warmup_and_single_step():
    s = cosine(0.07, 0.07, 10, warmup_iters=3, warmup_start=0.04)
    np.testing.assert_allclose(s, [0.04, 0.05, 0.06] + [0.07] * 7, atol=1e-12)
    np.testing.assert_array_equal(cosine(3.0, 1.0, 1), [3.0])


def test_cosine_rejects_bad_lengths():
    with pytest.raises(ValueError, match="total_iters"):
        cosine(1, 0, 0)
    with pytest.raises(ValueError, match="warmup_iters"):
        cosine(1, 0, 5, warmup_iters=5)


def test_reference_recipe():
    s = ssa_schedules(300, 10, lr=1e-3)
    assert len(s) == 3000
    for arr in (s.lr, s.weight_decay, s.teacher_temp, s.teacher_momentum, s.freeze_prototypes):
        assert arr.shape == (3000,)
    # lr: 10 epochs (100 steps) linear from 0, then cosine to 1e-6.
    assert s.lr[0] == 0.0
    assert s.lr[50] == pytest.approx(5e-4)
    assert s.lr[100] == pytest.approx(1e-3)
    assert s.lr.max() == pytest.approx(1e-3)
    assert s.lr[-1] == pytest.approx(1e-6)
    assert s.lr[100 + 2899 // 2] == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-3)
    # weight decay and momentum: cosine over the whole run.
    assert (s.weight_decay[0], s.weight_decay[-1]) == (pytest.approx(1e-5), pytest.approx(1e-4))
    assert (s.teacher_momentum[0], s.teacher_momentum[-1]) == (pytest.approx(0.994), pytest.approx(1.0))
    assert s.teacher_momentum[1500] == pytest.approx(0.997, abs=1e-5)
    # teacher temperature: linear 0.04 -> 0.07 over 30 epochs, then constant.
    assert s.teacher_temp[0] == pytest.approx(0.04)
    assert s.teacher_temp[150] == pytest.approx(0.055)
    np.testing.assert_allclose(s.teacher_temp[300:], 0.07, atol=1e-12)
    # prototypes frozen during the first epoch.
    assert s.freeze_prototypes.sum() == 10 and s.freeze_prototypes[:10].all()


def test_short_run_clamps_warmups_to_half():
    s = ssa_schedules(2, 5, lr=1e-4)
    assert len(s) == 10
    np.testing.assert_allclose(s.lr[:6], [0, 2e-5, 4e-5, 6e-5, 8e-5, 1e-4], atol=1e-12)
    assert s.lr[-1] == pytest.approx(1e-6)
    np.testing.assert_allclose(s.teacher_temp[5:], 0.07, atol=1e-12)
    assert s.teacher_temp[0] == pytest.approx(0.04)
    np.testing.assert_array_equal(s.freeze_prototypes, [True] * 5 + [False] * 5)
    # One epoch: the prototype freeze is clamped too, so the prototypes train in the second half.
    np.testing.assert_array_equal(ssa_schedules(1, 4, lr=1e-4).freeze_prototypes, [True, True, False, False])


def test_ssa_schedules_rejects_empty_run():
    with pytest.raises(ValueError, match="iters_per_epoch"):
        ssa_schedules(3, 0, lr=1e-4)

import numpy as np
import pytest

from essa.ssl.schedules import cosine, length_steps, ssa_schedules


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
    s = ssa_schedules(300, 10, lr=1e-3, warmup="10 epochs", teacher_temp_warmup="30 epochs",
                      freeze_prototypes="1 epoch")
    assert len(s) == 3000
    for arr in (s.lr, s.head_lr, s.weight_decay, s.teacher_temp, s.teacher_momentum, s.freeze_prototypes,
                s.head_warmup):
        assert arr.shape == (3000,)
    # lr: 10 epochs (100 steps) linear from 0, then cosine to 1e-6; no head warm-up, so the head's is the same
    assert s.lr[0] == 0.0
    assert s.lr[50] == pytest.approx(5e-4)
    assert s.lr[100] == pytest.approx(1e-3)
    assert s.lr.max() == pytest.approx(1e-3)
    assert s.lr[-1] == pytest.approx(1e-6)
    assert s.lr[100 + 2899 // 2] == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-3)
    np.testing.assert_array_equal(s.head_lr, s.lr)
    assert not s.head_warmup.any() and s.warnings == ()
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


def test_the_default_fractions_are_the_reference_at_any_length():
    for epochs, iters in ((300, 10), (2, 100)):
        s = ssa_schedules(epochs, iters, lr=1e-3)
        total = epochs * iters
        assert int(s.lr.argmax()) == round(total / 30)  # the end of the ramp
        assert s.teacher_temp[round(total / 10):].min() == pytest.approx(0.07)
        assert s.teacher_temp[round(total / 10) - 1] < 0.07
        assert s.freeze_prototypes.sum() == round(total / 300)


def test_lengths_as_fractions_steps_and_epochs():
    assert [length_steps(v, 200, 20) for v in (0.1, 0, 0.5, 30, 30.0, "2 epochs", "1.5 ep", "3epoch")] == \
        [20, 0, 100, 30, 30, 40, 30, 60]
    for bad in (1.5, -1, "ten epochs", "10", True, float("nan")):
        with pytest.raises(ValueError, match="optim.warmup=.*fraction"):
            length_steps(bad, 200, 20, "optim.warmup")


def test_head_warmup_then_the_tuners_own_ramp():
    s = ssa_schedules(1, 20, lr=1e-3, head_lr=5e-3, min_lr=0.0, head_warmup=0.25, warmup=4)
    assert s.head_warmup.tolist() == [True] * 5 + [False] * 15 and s.head_warmup_steps == 5
    np.testing.assert_allclose(s.lr[:10], [0] * 5 + [0, 2.5e-4, 5e-4, 7.5e-4, 1e-3], atol=1e-12)
    assert s.lr[-1] == pytest.approx(0.0, abs=1e-12)
    # the head ramps from step 0 over the same 4 steps, to its own lr
    np.testing.assert_allclose(s.head_lr[:5], [0, 1.25e-3, 2.5e-3, 3.75e-3, 5e-3], atol=1e-12)
    assert s.head_lr.max() == pytest.approx(5e-3)


def test_a_schedule_longer_than_the_run_is_clamped_and_named():
    s = ssa_schedules(1, 10, lr=1e-3, head_warmup=8, warmup="1 epoch", teacher_temp_warmup=50)
    assert s.head_warmup_steps == 8
    assert s.lr[8] == 0 and s.lr[9] > 0  # a 1-step ramp: what is left after the warm-up
    assert s.teacher_temp[-1] == pytest.approx(0.07) and s.teacher_temp[-2] < 0.07
    assert any("optim.warmup='1 epoch' is 10 steps, longer than this run of 10 steps allows: clamped to 1" in w
               for w in s.warnings)
    assert any(w.startswith("ssl.teacher_temp_warmup=50 is 50 steps") for w in s.warnings) and len(s.warnings) == 2


def test_ssa_schedules_rejects_empty_run():
    with pytest.raises(ValueError, match="iters_per_epoch"):
        ssa_schedules(3, 0, lr=1e-4)


def test_tuner_schedules_ramp_both_lrs_from_step_0_and_end_at_min_lr():
    from essa.ssl.schedules import tuner_schedules

    s = tuner_schedules(2, 5, 1e-3, head_lr=4e-3, min_lr=1e-6, warmup=4, weight_decay=(1e-5, 1e-4))
    assert len(s) == 10 and s.warnings == ()
    assert s.lr[:5].tolist() == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])  # the ramp, then the cosine's start
    assert s.head_lr[:5].tolist() == pytest.approx([0.0, 1e-3, 2e-3, 3e-3, 4e-3])
    assert s.lr[-1] == pytest.approx(1e-6) and s.head_lr[-1] == pytest.approx(1e-6)
    assert s.weight_decay[0] == pytest.approx(1e-5) and s.weight_decay[-1] == pytest.approx(1e-4)
    assert (tuner_schedules(1, 4, 1e-3).head_lr == tuner_schedules(1, 4, 1e-3).lr).all()  # head_lr None: lr's
    clamped = tuner_schedules(1, 4, 1e-3, warmup="2 epochs")
    assert clamped.warnings == ("optim.warmup='2 epochs' is 8 steps, longer than this run of 4 steps allows: "
                                "clamped to 3",) and clamped.lr[3] == pytest.approx(1e-3)

import math

import pytest
import torch

from essa.ssl.collapse import CollapseWatch, head_stats
from essa.ssl.heads import HeadInputNorm


def test_head_stats_of_uniform_one_hot_and_spread_heads():
    k = 64
    flat = head_stats(torch.zeros(8, k), torch.zeros(k), 0.04, torch.zeros(8, k), 0.1)
    assert flat["teacher_entropy"] == pytest.approx(math.log(k), abs=1e-5)
    assert flat["student_kl_uniform"] == pytest.approx(0.0, abs=1e-5)
    assert flat["teacher_batch_entropy"] == pytest.approx(math.log(k), abs=1e-5)

    same = torch.full((8, k), -10.0)
    same[:, 3] = 10.0  # every row picks prototype 3
    one_hot = head_stats(same, torch.zeros(k), 0.04, same, 0.1)
    assert one_hot["prototypes_used"] == 1 and one_hot["teacher_batch_entropy"] < 1e-6
    assert one_hot["student_kl_uniform"] == pytest.approx(math.log(k), abs=1e-4)

    spread = torch.full((8, k), -10.0)
    spread[torch.arange(8), torch.arange(8) * 2] = 10.0  # each row its own prototype
    healthy = head_stats(spread, torch.zeros(k), 0.04, spread, 0.1)
    assert healthy["prototypes_used"] == 8 and healthy["teacher_entropy"] < 1e-6
    assert healthy["teacher_batch_entropy"] == pytest.approx(math.log(8), abs=1e-5)
    # the center is subtracted before the temperature: a center equal to the logits leaves the teacher uniform
    assert head_stats(same, same[0], 0.04, same, 0.1)["teacher_entropy"] == pytest.approx(math.log(k), abs=1e-5)


def test_the_watch_counts_consecutive_collapsed_steps():
    k = 256
    log_k = math.log(k)
    watch = CollapseWatch(k, patience=3)
    healthy = {"teacher_entropy": 2.0, "teacher_batch_entropy": 4.0}
    uniform = {"teacher_entropy": log_k - 0.001, "teacher_batch_entropy": log_k}
    assert watch.update(uniform, 6.0) is None and watch.update(uniform, 6.0) is None and watch.steps == 2
    assert watch.update(healthy, 4.0) is None and watch.steps == 0  # a healthy step resets the count
    assert watch.update(healthy, log_k + 0.01) is None and watch.steps == 1  # the DINO loss at ln K
    assert watch.update({"teacher_entropy": 0.1, "teacher_batch_entropy": 0.0}, 3.0) is None
    reason = watch.update(uniform, 6.0)
    assert watch.steps == 3 and reason.startswith("the teacher's distribution over the 256 prototypes is uniform")
    assert "the same prototype" in watch.state({"teacher_entropy": 0.1, "teacher_batch_entropy": 0.0}, 3.0)


def test_head_input_norm_starts_from_the_first_batch_and_moves_by_its_momentum():
    torch.manual_seed(0)
    norm = HeadInputNorm(4, momentum=0.9)
    x = torch.randn(100, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 5.0
    norm.update(x, HeadInputNorm.CLS)
    y = norm(x, HeadInputNorm.CLS)
    torch.testing.assert_close(y.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    assert not norm.started[HeadInputNorm.PATCH]
    torch.testing.assert_close(norm(x, HeadInputNorm.PATCH), x)  # patch statistics not started: identity
    norm.update(x + 1.0, HeadInputNorm.CLS)
    torch.testing.assert_close(norm.mean[0], 0.9 * x.mean(0) + 0.1 * (x.mean(0) + 1.0))
    assert set(norm.state_dict()) == {"mean", "var", "started"}

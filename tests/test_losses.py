import torch
import torch.nn.functional as F

from adistill.config import DistillConfig
from adistill.heads import calibrate_threshold
from adistill.losses import distillation_loss


def test_alpha_one_beta_zero_is_plain_cross_entropy() -> None:
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    out = distillation_loss(s, t, y, DistillConfig(alpha=1.0, beta=0.0))
    torch.testing.assert_close(out.total, F.cross_entropy(s, y))


def test_kd_term_is_zero_when_student_matches_teacher_and_scales_with_tau_squared() -> None:
    s, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    assert distillation_loss(s, s.clone(), y, DistillConfig()).kd.abs() < 1e-6
    t = torch.randn(4, 5)
    kd1 = distillation_loss(s, t, y, DistillConfig(temperature=1.0)).kd
    expected = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")
    torch.testing.assert_close(kd1, expected)
    kd2 = distillation_loss(s, t, y, DistillConfig(temperature=2.0)).kd
    expected2 = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") * 4
    torch.testing.assert_close(kd2, expected2)


def test_total_combines_terms_and_detach_switch_controls_teacher_gradient() -> None:
    y = torch.tensor([0, 1])
    for detach, expect_kd_grad in ((True, False), (False, True)):
        s = torch.randn(2, 3, requires_grad=True)
        t = torch.randn(2, 3, requires_grad=True)
        cfg = DistillConfig(alpha=0.3, beta=0.0, detach_teacher=detach)
        out = distillation_loss(s, t, y, cfg)
        torch.testing.assert_close(out.total, 0.3 * out.student_ce + 0.7 * out.kd)
        out.total.backward()
        assert (t.grad is not None and t.grad.abs().sum() > 0) == expect_kd_grad


def test_hidden_mse_term() -> None:
    s, t, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1])
    hs, ht = [torch.ones(2, 4)], [torch.zeros(2, 4)]
    out = distillation_loss(s, t, y, DistillConfig(gamma=0.5), hs, ht)
    torch.testing.assert_close(out.hidden_mse, torch.tensor(1.0))
    assert torch.isclose(out.total - (0.5 * out.student_ce + 0.5 * out.kd + out.teacher_ce), torch.tensor(0.5))


def test_threshold_separates_confident_in_scope_from_out_of_scope() -> None:
    t = calibrate_threshold(torch.tensor([0.9, 0.8, 0.95]), torch.tensor([0.3, 0.4]), torch.tensor([True] * 3))
    assert 0.4 < t <= 0.8 + 1e-6  # candidates are the float32 probabilities themselves

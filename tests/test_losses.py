import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pkdpipe.errors import ConfigError
from pkdpipe.losses import (
    VAR_FLOOR,
    ce_loss,
    convert_authors_hparams,
    kd_loss,
    patient_loss,
    patient_space,
    pkd_loss,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _kd_loop(s, t, temperature):
    """T^2 * mean over examples of sum over classes of p_t * (log p_t - log p_s), in plain python."""
    total = 0.0
    for s_row, t_row in zip(s.double().tolist(), t.double().tolist(), strict=True):
        s_max, t_max = max(s_row), max(t_row)
        s_z = sum(math.exp((x - s_max) / temperature) for x in s_row)
        t_z = sum(math.exp((x - t_max) / temperature) for x in t_row)
        for s_x, t_x in zip(s_row, t_row, strict=True):
            log_ps = (s_x - s_max) / temperature - math.log(s_z)
            log_pt = (t_x - t_max) / temperature - math.log(t_z)
            total += math.exp(log_pt) * (log_pt - log_ps)
    return temperature**2 * total / len(s)


def _pt_loop(s, t, normalize):
    """Mean over examples and layers of the squared distance between (unit) vectors, in plain python."""
    batch, layers, _ = s.shape
    total = 0.0
    for b in range(batch):
        for m in range(layers):
            sv, tv = s[b, m].double().tolist(), t[b, m].double().tolist()
            if normalize:
                s_norm = math.sqrt(sum(x * x for x in sv))
                t_norm = math.sqrt(sum(x * x for x in tv))
                sv = [x / s_norm for x in sv]
                tv = [x / t_norm for x in tv]
            total += sum((x - y) ** 2 for x, y in zip(sv, tv, strict=True))
    return total / (batch * layers)


def _standardized_loop(s, t, mean, std, space):
    """The patient spaces by hand, one number at a time: both sides moved, then `_pt_loop`'s distance."""
    batch, layers, hidden = s.shape
    s, t = s.double().tolist(), t.double().tolist()
    mean, std = mean.double().tolist(), std.double().tolist()

    def floored(variances):
        ordered = sorted(variances)
        median = ordered[(len(ordered) - 1) // 2]  # torch.median: the lower of the two middle values
        return [math.sqrt(v + VAR_FLOOR * median + 1e-12) for v in variances]

    s_out = [[[0.0] * hidden for _ in range(layers)] for _ in range(batch)]
    t_out = [[[0.0] * hidden for _ in range(layers)] for _ in range(batch)]
    for m in range(layers):
        t_std = floored([x * x for x in std[m]])
        s_mean = [sum(s[b][m][d] for b in range(batch)) / batch for d in range(hidden)]
        s_var = [sum((s[b][m][d] - s_mean[d]) ** 2 for b in range(batch)) / batch for d in range(hidden)]
        s_std = floored(s_var)
        for b in range(batch):
            for d in range(hidden):
                t_out[b][m][d] = (t[b][m][d] - mean[m][d]) / (1.0 if space == "centered" else t_std[d])
                if space == "standardized-teacher":
                    s_out[b][m][d] = (s[b][m][d] - mean[m][d]) / t_std[d]
                else:
                    s_out[b][m][d] = (s[b][m][d] - s_mean[d]) / (1.0 if space == "centered" else s_std[d])
    return torch.tensor(s_out), torch.tensor(t_out)


# ---- kd_loss


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0, 20.0])
def test_kd_matches_kl_div_reference(temperature):
    s, t = torch.randn(8, 3) * 3, torch.randn(8, 3) * 3
    reference = (
        F.kl_div(
            F.log_softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1), reduction="batchmean"
        )
        * temperature**2
    )
    torch.testing.assert_close(kd_loss(s, t, temperature), reference)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 10.0])
def test_kd_matches_python_loop(temperature):
    s, t = torch.randn(5, 4) * 2, torch.randn(5, 4) * 2
    assert kd_loss(s, t, temperature).item() == pytest.approx(_kd_loop(s, t, temperature), rel=1e-5)


def test_kd_zero_when_student_equals_teacher():
    logits = torch.randn(6, 3)
    assert kd_loss(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_temperature_squared_scaling():
    s, t = torch.tensor([[1.0, -1.0]]), torch.tensor([[4.0, 0.0]])
    # at T = 2: p_s = softmax([0.5, -0.5]) = (sigmoid(1), sigmoid(-1)), p_t = (sigmoid(2), sigmoid(-2))
    p_s = [1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(1.0))]
    p_t = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(2.0))]
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
    assert kd_loss(s, t, 2.0).item() == pytest.approx(4 * kl, rel=1e-5)
    unscaled = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean")
    assert kd_loss(s, t, 2.0).item() == pytest.approx(4 * unscaled.item(), rel=1e-6)


def test_kd_gradient_finite_with_extreme_logits():
    s = torch.tensor([[80.0, -80.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-90.0, 90.0, 0.0], [1e4, -1e4, 0.0]])
    loss = kd_loss(s, t, 1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all()


def test_kd_float16_teacher():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    loss = kd_loss(s, t.half(), 3.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, kd_loss(s, t.half().float(), 3.0))


def test_kd_regression_is_mse():
    s, t = torch.randn(5, 1), torch.randn(5, 1)
    torch.testing.assert_close(kd_loss(s, t, 10.0), ((s - t) ** 2).mean())


def test_kd_refuses_bad_temperature_and_shapes():
    with pytest.raises(ConfigError, match="the KD temperature must be positive, got 0"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), 0)
    with pytest.raises(ValueError, match="differ in shape"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 2), 1.0)


# ---- ce_loss


def test_ce_classification():
    logits, labels = torch.randn(6, 3), torch.randint(0, 3, (6,))
    torch.testing.assert_close(ce_loss(logits, labels), F.cross_entropy(logits, labels))


def test_ce_regression_is_mse():
    outputs, scores = torch.randn(7, 1), torch.rand(7) * 5
    expected = sum((o - y) ** 2 for o, y in zip(outputs[:, 0].tolist(), scores.tolist(), strict=True)) / 7
    assert ce_loss(outputs, scores, regression=True).item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(
        ce_loss(outputs[:, 0], scores, regression=True), ce_loss(outputs, scores, True)
    )


def test_ce_regression_refuses_broadcasting():
    with pytest.raises(ValueError, match="do not fit labels"):
        ce_loss(torch.randn(4, 2), torch.randn(4), regression=True)


# ---- patient_loss


@pytest.mark.parametrize("normalize", [True, False])
def test_patient_matches_python_loop(normalize):
    s, t = torch.randn(3, 4, 16), torch.randn(3, 4, 16) * 2
    assert patient_loss(s, t, normalize).item() == pytest.approx(_pt_loop(s, t, normalize), rel=1e-5)


def test_patient_is_two_minus_two_cos():
    s, t = torch.randn(4, 2, 32), torch.randn(4, 2, 32)
    expected = (2 - 2 * F.cosine_similarity(s, t, dim=-1)).mean()
    torch.testing.assert_close(patient_loss(s, t), expected)


def test_patient_matches_authors_element_mean_times_hidden():
    # the authors' patience_loss: F.mse_loss of F.normalize(dim=2) vectors, a mean over every element
    s, t = torch.randn(5, 3, 24), torch.randn(5, 3, 24)
    authors = F.mse_loss(F.normalize(t, p=2, dim=2), F.normalize(s, p=2, dim=2))
    torch.testing.assert_close(patient_loss(s, t), authors * 24)


def test_patient_scale_invariance_only_when_normalised():
    s, t = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    scales = torch.rand(2, 3, 1) * 10 + 0.1
    torch.testing.assert_close(patient_loss(s, t * scales), patient_loss(s, t))
    assert not torch.allclose(
        patient_loss(s, t * scales, normalize=False), patient_loss(s, t, normalize=False)
    )


def test_patient_zero_vectors_no_nan():
    s = torch.zeros(2, 2, 8, requires_grad=True)
    t = torch.randn(2, 2, 8)
    t[0, 0] = 0
    loss = patient_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all()
    # a zero vector stays zero: distance 1 to each unit vector, 0 to the zero teacher vector
    assert loss.item() == pytest.approx(3 / 4)


def test_patient_float16_teacher():
    s = torch.randn(4, 2, 16, requires_grad=True)
    t = torch.randn(4, 2, 16).half()
    loss = patient_loss(s, t)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, patient_loss(s, t.float()))
    assert torch.isfinite(s.grad).all()


def test_patient_float16_student_upcast():
    s, t = torch.randn(4, 2, 16) * 300, torch.randn(4, 2, 16) * 300
    loss = patient_loss(s.half(), t.half(), normalize=False)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)  # squared distances ~1e7 would overflow float16


def test_patient_no_layers_is_zero():
    loss = patient_loss(torch.randn(4, 0, 16), torch.randn(4, 0, 16).half())
    assert loss.item() == 0.0
    assert loss.shape == ()


def test_patient_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(batch, M, hidden\)"):
        patient_loss(torch.randn(2, 3, 8), torch.randn(2, 2, 8))
    with pytest.raises(ValueError, match=r"\(batch, M, hidden\)"):
        patient_loss(torch.randn(2, 8), torch.randn(2, 8))


# ---- the patient spaces: where examples differ


def _layer_stats(t):
    """A teacher layer's train statistics as the cache has them: (M, hidden) mean and std."""
    return t.mean(dim=0), t.std(dim=0, unbiased=False)


@pytest.mark.parametrize("space", ["centered", "standardized", "standardized-teacher"])
def test_each_patient_space_equals_its_formula_by_hand(space):
    s = torch.randn(6, 2, 5) + torch.tensor([4.0, 0, 0, 0, 0])
    t = torch.randn(6, 2, 5) * torch.tensor([0.01, 1, 2, 0.5, 1]) + torch.tensor([30.0, 0, 0, 0, 0])
    mean, std = _layer_stats(torch.randn(50, 2, 5) * 2 + 1)  # statistics of other rows than the batch
    s_ref, t_ref = _standardized_loop(s, t, mean, std, space)
    s_got, t_got = patient_space(s, t, space, mean, std)
    torch.testing.assert_close(s_got, s_ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t_got, t_ref.float(), rtol=1e-5, atol=1e-5)
    expected = _pt_loop(s_ref, t_ref, normalize=True)
    assert float(patient_loss(s, t, True, space, mean, std)) == pytest.approx(expected, rel=1e-5)


def test_a_standardised_target_keeps_what_differs_between_examples():
    """The case of the encoders at hand: one large dimension shared by every example hides the
    rest. The paper's loss sees nearly one target; the standardised loss sees the examples apart."""
    base = torch.randn(64, 1, 16)
    teacher = base.clone()
    teacher[..., 0] = 400.0  # the outlier dimension, the same for every row
    mean, std = _layer_stats(teacher)
    raw_targets = F.normalize(teacher, dim=-1)
    assert float((raw_targets - raw_targets.mean(0)).pow(2).sum(-1).mean()) < 2e-3
    student = base.clone()
    student[..., 0] = -3.0  # a student whose [CLS] varies as the teacher's, with its own constant part
    assert float(patient_loss(student, teacher, True, "standardized", mean, std)) < 1e-3
    shuffled = student[torch.randperm(64)]  # the same vectors, paired with the wrong examples
    assert float(patient_loss(shuffled, teacher, True, "standardized", mean, std)) > 1.0
    assert float(patient_loss(shuffled, teacher)) > 1.0  # raw: the outlier is missing on the student side
    anchored = shuffled.clone()
    anchored[..., 0] = 400.0  # ... and once the student carries it, raw cannot tell examples apart
    assert float(patient_loss(anchored, teacher)) < 2e-3


def test_standardised_loss_ignores_the_students_offsets_and_scales():
    t = torch.randn(16, 2, 8)
    mean, std = _layer_stats(t)
    s = t * torch.linspace(0.1, 10, 8) + 50.0  # another offset and scale per dimension, same pattern
    assert float(patient_loss(s, t, True, "standardized", mean, std)) < 1e-4
    assert float(patient_loss(s, t, True, "raw")) > 0.5


def test_a_constant_dimension_stays_near_zero_when_standardised():
    t = torch.randn(32, 1, 4)
    t[..., 2] = 7.0  # never varies: its std is 0
    mean, std = _layer_stats(t)
    s = torch.randn(32, 1, 4, requires_grad=True)
    s_space, t_space = patient_space(s, t, "standardized", mean, std)
    assert t_space[..., 2].abs().max() == 0 and torch.isfinite(s_space).all()
    loss = patient_loss(s, t, True, "standardized", mean, std)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_a_batch_of_one_centres_to_zero_without_nan():
    s, t = torch.randn(1, 2, 8, requires_grad=True), torch.randn(1, 2, 8)
    mean, std = _layer_stats(torch.randn(10, 2, 8))
    loss = patient_loss(s, t, True, "standardized", mean, std)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(1.0) and torch.isfinite(s.grad).all()  # |0 - t/|t||^2 = 1


def _pair_cosine_loop(s, t):
    """Mean over layers and ordered pairs i != j of (cos(s_i, s_j) - cos(t_i, t_j))^2, by hand."""
    batch, layers, _ = s.shape
    total, count = 0.0, 0
    for m in range(layers):
        for i in range(batch):
            for j in range(batch):
                if i != j:
                    cs = F.cosine_similarity(s[i, m].double(), s[j, m].double(), dim=0)
                    ct = F.cosine_similarity(t[i, m].double(), t[j, m].double(), dim=0)
                    total, count = total + float(cs - ct) ** 2, count + 1
    return total / count


def test_the_relational_loss_compares_how_examples_relate_by_hand():
    s = torch.randn(6, 2, 5) + 3.0
    t = torch.randn(6, 2, 5) * torch.tensor([0.01, 1, 2, 0.5, 1]) + 30.0
    mean, std = _layer_stats(torch.randn(40, 2, 5) * 2 + 30)
    s_std, t_std = _standardized_loop(s, t, mean, std, "standardized")  # the relational loss's coordinates
    expected = _pair_cosine_loop(s_std, t_std)
    assert float(patient_loss(s, t, True, "relational", mean, std)) == pytest.approx(expected, rel=1e-5)


def test_the_relational_loss_needs_no_coordinate_of_the_student_to_match_the_teachers():
    t = torch.randn(32, 2, 16)
    mean, std = _layer_stats(t)
    permuted = t[..., torch.randperm(16)] * 5.0 - 2.0  # the same examples in other coordinates
    assert float(patient_loss(permuted, t, True, "relational", mean, std)) < 1e-8
    assert float(patient_loss(permuted, t, True, "standardized", mean, std)) > 1.0
    shuffled = permuted[torch.randperm(32)]  # ... but paired with the wrong examples: relations differ
    assert float(patient_loss(shuffled, t, True, "relational", mean, std)) > 1e-3
    one = patient_loss(t[:1].requires_grad_(), t[:1], True, "relational", mean, std)
    one.backward()
    assert float(one) == 0.0  # a batch of one row has no pairs


def test_patient_spaces_refuse_what_they_cannot_use():
    s, t = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    with pytest.raises(ConfigError, match="unknown patient space 'whitened'"):
        patient_loss(s, t, space="whitened")
    with pytest.raises(ValueError, match="needs the teacher layers' mean and std"):
        patient_loss(s, t, space="standardized")
    with pytest.raises(ValueError, match="do not fit"):
        patient_loss(s, t, True, "centered", torch.zeros(3, 8), torch.ones(3, 8))


# ---- pkd_loss


def _batch(batch=6, labels=3, layers=5, hidden=16):
    return {
        "student_logits": torch.randn(batch, labels, requires_grad=True),
        "teacher_logits": torch.randn(batch, labels),
        "labels": torch.randint(0, labels, (batch,)),
        "student_cls": torch.randn(batch, layers, hidden, requires_grad=True),
        "teacher_cls": torch.randn(batch, layers, hidden).half(),
    }


def test_pkd_total_is_weighted_sum():
    b = _batch()
    out = pkd_loss(**b, alpha=0.7, beta=0.5, temperature=10.0)
    assert set(out) == {"loss", "ce", "kd", "pt"}
    torch.testing.assert_close(out["ce"], ce_loss(b["student_logits"], b["labels"]))
    torch.testing.assert_close(out["kd"], kd_loss(b["student_logits"], b["teacher_logits"], 10.0))
    torch.testing.assert_close(out["pt"], patient_loss(b["student_cls"], b["teacher_cls"]))
    torch.testing.assert_close(out["loss"], 0.3 * out["ce"] + 0.7 * out["kd"] + 0.5 * out["pt"])
    out["loss"].backward()
    assert torch.isfinite(b["student_logits"].grad).all()
    assert torch.isfinite(b["student_cls"].grad).all()


def test_pkd_alpha_beta_zero_is_ce():
    b = _batch()
    out = pkd_loss(**b, alpha=0.0, beta=0.0, temperature=5.0)
    assert torch.equal(out["loss"], out["ce"])
    assert out["kd"].item() > 0 and out["pt"].item() > 0  # still reported


def test_pkd_ft_mode_without_teacher():
    b = _batch()
    out = pkd_loss(b["student_logits"], None, b["labels"], None, None, alpha=0.7, beta=100.0, temperature=5.0)
    assert torch.equal(out["loss"], out["ce"])
    assert out["kd"].item() == 0.0 and out["pt"].item() == 0.0


@pytest.mark.parametrize("layers", [None, 0])
def test_pkd_kd_mode_without_patient_loss(layers):
    b = _batch(layers=0)
    if layers is None:
        b["student_cls"] = b["teacher_cls"] = None
    out = pkd_loss(**b, alpha=0.5, beta=10.0, temperature=2.0)
    assert out["pt"].item() == 0.0
    torch.testing.assert_close(out["loss"], 0.5 * out["ce"] + 0.5 * out["kd"])


def test_pkd_regression():
    s, t, y = torch.randn(5, 1), torch.randn(5, 1), torch.randn(5)
    out = pkd_loss(s, t, y, None, None, alpha=0.5, beta=0.0, temperature=3.0, regression=True)
    torch.testing.assert_close(out["ce"], ((s[:, 0] - y) ** 2).mean())
    torch.testing.assert_close(out["kd"], ((s - t) ** 2).mean())


def test_pkd_refusals():
    b = _batch()
    with pytest.raises(ConfigError, match=r"alpha weighs KD against CE and must lie in \[0, 1\], got 1.5"):
        pkd_loss(**b, alpha=1.5, beta=0.0, temperature=1.0)
    with pytest.raises(ConfigError, match="beta weighs the patient loss and cannot be negative, got -1"):
        pkd_loss(**b, alpha=0.5, beta=-1, temperature=1.0)
    with pytest.raises(ValueError, match="both student and teacher"):
        pkd_loss(**{**b, "teacher_cls": None}, alpha=0.5, beta=1.0, temperature=1.0)
    with pytest.raises(ValueError, match="without teacher logits"):
        pkd_loss(**{**b, "teacher_logits": None}, alpha=0.5, beta=1.0, temperature=1.0)


# ---- the authors' hyperparameters


def test_convert_authors_hparams_reproduces_their_objective():
    # their objective, written as in src/KD_loss.py (KLDivLoss "mean" and F.mse_loss are element means)
    b = _batch(labels=2, hidden=32)
    a, beta_a, temperature = 0.7, 500.0, 10.0
    s, t = b["student_logits"], b["teacher_logits"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that "mean" is not the true KL divergence
        their_kd = nn.KLDivLoss(reduction="mean")(
            F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1)
        )
    their_kd = their_kd * temperature**2
    their_pt = F.mse_loss(F.normalize(b["teacher_cls"].float(), dim=2), F.normalize(b["student_cls"], dim=2))
    theirs = a * their_kd + (1 - a) * F.cross_entropy(s, b["labels"]) + beta_a * their_pt

    alpha, beta = convert_authors_hparams(a, beta_a, hidden_size=32, num_labels=2)
    ours = pkd_loss(**b, alpha=alpha, beta=beta, temperature=temperature)["loss"]
    torch.testing.assert_close(ours * ((1 - a) + a / 2), theirs)


def test_convert_authors_hparams_values():
    alpha, beta = convert_authors_hparams(0.7, 500, hidden_size=768, num_labels=2)
    assert alpha == pytest.approx(0.35 / 0.65)
    assert beta == pytest.approx(500 / (768 * 0.65))
    # without KD in the mix only beta changes, by the hidden size
    assert convert_authors_hparams(0.0, 100, hidden_size=768, num_labels=3) == (0.0, pytest.approx(100 / 768))

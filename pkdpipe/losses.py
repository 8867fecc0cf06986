"""The PKD objective as pure functions of tensors (Sun et al. 2019, eq. 7):

    loss = (1 - alpha) * CE + alpha * KD + beta * PT

Reductions used by pkdpipe (every term is a mean over the batch, so no weight depends on batch size):

- CE: cross-entropy with the gold labels, mean over the batch. Regression tasks (one output): MSE
  with the gold scores, mean over the batch.
- KD: T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over the batch, i.e.
  `F.kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") * T**2` (Hinton et al.; the T^2
  keeps its gradients on the scale of CE's as T changes). Regression (one output): MSE between the
  student's and the teacher's outputs, mean over the batch; the temperature plays no part there.
- PT: for each example and each of the M mapped layers, the squared Euclidean distance between the
  L2-normalised student and teacher [CLS] vectors, summed over the hidden units; then the mean over
  the batch and the M layers. For unit vectors that distance is 2 - 2cos(s, t), so PT lies in [0, 4]
  whatever the hidden size, the number of layers or the batch size.

How this compares with the authors' code (intersun/PKD-for-BERT-Model-Compression, `src/KD_loss.py`,
called from `NLI_KD_training.py`):

- `patience_loss` L2-normalises the stacked [CLS] vectors (batch, M, hidden) over hidden and returns
  `F.mse_loss(teacher, student)`: a mean over ALL batch * M * hidden elements. Their PT is therefore
  ours divided by the hidden size H, which is why their beta grid is 10, 100, 500, 1000. We do not
  copy that element mean: it makes beta's strength depend on H (the same beta is half as strong on
  a 384-wide MiniLM as on a 768-wide BERT-base), whereas the per-vector distance means one thing for
  every model. Both average over the M layers (the paper's formula sums over them), so M never
  enters the conversion:

      pkdpipe beta = authors' beta / H
      authors' beta 100, H = 768, M = 5 (12→6 skip)  ->  pkdpipe beta 100 / 768 ≈ 0.130
      their grid 10, 100, 500, 1000 at H = 768         ->  0.013, 0.130, 0.651, 1.302

- `distillation_loss` uses `nn.KLDivLoss(reduction="mean")`, which (in every PyTorch since 0.4)
  averages over batch * classes, not over the batch: their KD term is ours divided by the number of
  labels C. To reproduce their whole objective with alpha a and beta b, use
  `convert_authors_hparams(a, b, hidden_size=H, num_labels=C)`: it returns the pkdpipe alpha and beta
  whose loss equals theirs divided by s = (1 - a) + a / C, an overall factor that Adam all but
  ignores. E.g. their a = 0.7, b = 500 on a 2-label task at H = 768 -> alpha 0.538, beta 1.002.

Where PT compares the vectors (`pt_space`; see `patient_space`): the paper compares them as they
are ("raw"). In the encoders at hand one outlier dimension dominates the [CLS] vector of most
intermediate layers, so the normalised teacher target is nearly one vector for every example
(`pkdpipe.cache.stats`). The other spaces take out what every example shares before normalising:
"centered" subtracts the per-dimension mean (the teacher's from the cache's train statistics, the
student's over its batch), "standardized" also divides by the per-dimension standard deviation, and
"standardized-teacher" standardises both sides with the teacher's cached statistics (the student in
the teacher's coordinates). "relational" compares, in standardised coordinates, how each pair of the
batch's examples relates (the cosine between them) instead of the vectors themselves, so no
coordinate of the student has to match the teacher's (as similarity-preserving KD, Tung and Mori
2019). Every form stays in [0, 4].

All inputs are upcast to at least float32 inside the functions (the cached teacher [CLS] vectors
are float16, and a student under autocast yields float16 or bfloat16), so each loss is float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pkdpipe.errors import ConfigError

PT_SPACES = ("raw", "centered", "standardized", "standardized-teacher", "relational")
"""Where the patient loss compares [CLS] vectors (`patient_space`, `patient_loss`)."""

NORM_EPS = 1e-6
"""Vectors shorter than this are divided by it instead of by their length when normalised: a zero
vector stays zero (at distance 1 from any unit vector) and the gradient stays below 1 / NORM_EPS.
Real [CLS] vectors are layer-normed, with lengths near sqrt(hidden), so it never touches them."""


def _upcast(*tensors: Tensor) -> list[Tensor]:
    """The tensors in one common dtype, at least float32."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return [tensor.to(dtype) for tensor in tensors]


def ce_loss(student_logits: Tensor, labels: Tensor, regression: bool = False) -> Tensor:
    """Loss against the gold labels, mean over the batch; a float32 scalar.

    Args:
        student_logits: (batch, num_labels); for regression (batch, 1) or (batch,).
        labels: (batch,) class indices; for regression (batch,) float scores.
        regression: use MSE instead of cross-entropy.
    """
    (logits,) = _upcast(student_logits)
    if not regression:
        return F.cross_entropy(logits, labels.long())
    if logits.dim() == 2 and logits.shape[-1] == 1:
        logits = logits.squeeze(-1)
    if logits.shape != labels.shape:
        # (batch, 1) against (batch,) would broadcast to (batch, batch) without a word
        raise ValueError(
            f"regression outputs {tuple(student_logits.shape)} do not fit labels {tuple(labels.shape)}"
        )
    return F.mse_loss(logits, labels.to(logits.dtype))


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over the batch; a scalar.

    Args:
        student_logits: (batch, num_labels).
        teacher_logits: (batch, num_labels), any float dtype.
        temperature: T > 0; higher softens both distributions.

    With one output (a regression task) there are no classes to soften: the result is the MSE between
    student and teacher outputs, mean over the batch, and the temperature is not used.
    """
    if temperature <= 0:
        raise ConfigError(f"the KD temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    s, t = _upcast(student_logits, teacher_logits)
    if s.shape[-1] == 1:
        return F.mse_loss(s, t)
    log_p_student = F.log_softmax(s / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


VAR_FLOOR = 1e-6
"""Before a dimension is divided by its standard deviation, its variance is raised by this share of
the layer's median variance (and by 1e-12): a dimension that (nearly) never varies stays near 0
instead of being blown up to unit scale, and a student's batch whose dimension happens to be flat
(or a batch of one row) divides by no zero. The median, not the mean, so that one outlier dimension
with a large variance does not raise the floor of all the others."""


def _floored_std(var: Tensor) -> Tensor:
    """sqrt(var + VAR_FLOOR * median(var) + 1e-12) over the last dimension (hidden)."""
    return (var + VAR_FLOOR * var.median(dim=-1, keepdim=True).values + 1e-12).sqrt()


def patient_space(
    student_cls: Tensor,
    teacher_cls: Tensor,
    space: str = "raw",
    teacher_mean: Tensor | None = None,
    teacher_std: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Both sides of the patient loss in the coordinates where it compares them, as float32 or wider.

    Args:
        student_cls, teacher_cls: (batch, M, hidden).
        space: "raw" (as they are: the paper); "centered": t - mean_t and s - mean_batch(s);
            "standardized": (t - mean_t) / std_t and (s - mean_batch(s)) / std_batch(s);
            "standardized-teacher": (t - mean_t) / std_t and (s - mean_t) / std_t;
            "relational" is not a space of its own: `patient_loss` takes "standardized" for it.
        teacher_mean, teacher_std: (M, hidden), the teacher layers' per-dimension mean and standard
            deviation over the train split (the cache's statistics); needed by every space but raw.

    Standard deviations are floored (`VAR_FLOOR`). The student's batch statistics are those of the
    batch this process sees (its rank's share under torchrun), population variance; a batch of one
    row centres to zero. The returned tensors keep the graph of `student_cls`.
    """
    if space not in PT_SPACES or space == "relational":
        raise ConfigError(f"unknown patient space {space!r}: choose one of {', '.join(PT_SPACES)}")
    s, t = _upcast(student_cls, teacher_cls)
    if space == "raw":
        return s, t
    if teacher_mean is None or teacher_std is None:
        raise ValueError(f"the {space!r} patient space needs the teacher layers' mean and std")
    mean, std = teacher_mean.to(t), _floored_std(teacher_std.to(t) ** 2)
    if mean.shape != t.shape[1:] or std.shape != t.shape[1:]:
        raise ValueError(
            f"teacher statistics of shape {tuple(teacher_mean.shape)} do not fit [CLS] vectors "
            f"{tuple(t.shape)}: expected (M, hidden)"
        )
    t = t - mean
    if space == "standardized-teacher":
        return (s - mean) / std, t / std
    s = s - s.mean(dim=0, keepdim=True)
    if space == "centered":
        return s, t
    return s / _floored_std(s.pow(2).mean(dim=0, keepdim=True)), t / std


def patient_loss(
    student_cls: Tensor,
    teacher_cls: Tensor,
    normalize: bool = True,
    space: str = "raw",
    teacher_mean: Tensor | None = None,
    teacher_std: Tensor | None = None,
) -> Tensor:
    """Mean over the batch and the M layers of ||s/|s| - t/|t|||^2 (summed over hidden); a scalar.

    Args:
        student_cls: (batch, M, hidden) [CLS] vectors of the student's layers 1..M.
        teacher_cls: (batch, M, hidden) [CLS] vectors of the teacher layers mapped to them, any float
            dtype (the cache stores float16).
        normalize: L2-normalise each vector over hidden first (the paper's choice). Without it the
            raw squared distance is used, whose scale follows the vectors' lengths.
        space, teacher_mean, teacher_std: the coordinates s and t are compared in
            (`patient_space`; "raw" by default, the paper's).

    Returns 0 when M == 0. See the module docstring for how this relates to the authors' beta.
    """
    if student_cls.dim() != 3 or student_cls.shape != teacher_cls.shape:
        raise ValueError(
            f"patient loss needs two (batch, M, hidden) tensors of one shape, got "
            f"{tuple(student_cls.shape)} and {tuple(teacher_cls.shape)}"
        )
    if student_cls.numel() == 0:
        return _upcast(student_cls)[0].new_zeros(())
    relational = space == "relational"
    s, t = patient_space(
        student_cls, teacher_cls, "standardized" if relational else space, teacher_mean, teacher_std
    )
    if normalize or relational:
        s = s / s.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        t = t / t.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    if relational:
        return _pair_cosine_gap(s, t)
    return (s - t).pow(2).sum(dim=-1).mean()


def _pair_cosine_gap(s: Tensor, t: Tensor) -> Tensor:
    """Mean over the M layers and the batch's ordered pairs of distinct examples (i, j) of
    (cos_s(i, j) - cos_t(i, j))^2, for unit vectors s, t of (batch, M, hidden): how each pair of
    examples relates, compared between student and teacher (no coordinate of one need match the
    other's). In [0, 4]; 0 for a batch of one row (no pairs)."""
    batch = s.shape[0]
    if batch < 2:
        return s.sum() * 0.0  # keeps the graph, so backward runs whatever the batch
    cos_s = torch.einsum("bmh,cmh->mbc", s, s)
    cos_t = torch.einsum("bmh,cmh->mbc", t, t)
    off = ~torch.eye(batch, dtype=torch.bool, device=s.device)
    return (cos_s - cos_t).pow(2)[:, off].mean()


def pkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    student_cls: Tensor | None,
    teacher_cls: Tensor | None,
    *,
    alpha: float,
    beta: float,
    temperature: float,
    normalize: bool = True,
    regression: bool = False,
    pt_space: str = "raw",
    teacher_mean: Tensor | None = None,
    teacher_std: Tensor | None = None,
) -> dict[str, Tensor]:
    """(1 - alpha) * CE + alpha * KD + beta * PT, with each term for logging.

    Args:
        student_logits: (batch, num_labels), or (batch, 1) for regression.
        teacher_logits: (batch, num_labels), or None for plain fine-tuning (strategy ft): then the
            loss is CE alone, whatever alpha and beta say.
        labels: (batch,) gold class indices, or float scores for regression.
        student_cls, teacher_cls: (batch, M, hidden) [CLS] vectors of the mapped layers, or both None
            (strategy kd); with None or M == 0 the PT term is 0.
        alpha: weight of KD against CE, in [0, 1].
        beta: weight of PT, >= 0, in pkdpipe's reduction (authors' beta / hidden size).
        temperature: the KD temperature T.
        normalize: L2-normalise the [CLS] vectors in PT.
        regression: one-output task: MSE for CE and for KD.
        pt_space, teacher_mean, teacher_std: where PT compares the vectors (`patient_space`).

    Returns:
        {"loss", "ce", "kd", "pt"}: float32 scalars; each keeps its graph, so detach before logging.
        A term whose weight is 0 is still reported but left out of "loss" (so a NaN there cannot leak).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha weighs KD against CE and must lie in [0, 1], got {alpha}")
    if beta < 0:
        raise ConfigError(f"beta weighs the patient loss and cannot be negative, got {beta}")
    if (student_cls is None) != (teacher_cls is None):
        raise ValueError("the patient loss needs both student and teacher [CLS] vectors, or neither")
    ce = ce_loss(student_logits, labels, regression=regression)
    zero = ce.new_zeros(())
    if teacher_logits is None:
        if teacher_cls is not None:
            raise ValueError("teacher [CLS] vectors were given without teacher logits")
        return {"loss": ce, "ce": ce, "kd": zero, "pt": zero}
    kd = kd_loss(student_logits, teacher_logits, temperature)
    pt = (
        zero
        if student_cls is None
        else patient_loss(student_cls, teacher_cls, normalize, pt_space, teacher_mean, teacher_std)
    )
    terms = [(1.0 - alpha, ce), (alpha, kd), (beta, pt)]
    loss = sum((weight * term for weight, term in terms if weight != 0), start=zero)
    return {"loss": loss, "ce": ce, "kd": kd, "pt": pt}


def convert_authors_hparams(
    alpha: float, beta: float, *, hidden_size: int, num_labels: int
) -> tuple[float, float]:
    """pkdpipe's (alpha, beta) for the authors' (alpha, beta), so the objectives match.

    The authors' loss is (1 - a) * CE + a * KD / C + b * PT / H (their KD and PT are element means,
    see the module docstring). pkdpipe's loss with the returned values equals it divided by
    s = (1 - a) + a / C. With one label (regression) C = 1 and only beta changes: beta = b / H.

    >>> convert_authors_hparams(0.7, 500, hidden_size=768, num_labels=2)  # doctest: +ELLIPSIS
    (0.538..., 1.0016...)
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must lie in [0, 1], got {alpha}")
    if hidden_size < 1 or num_labels < 1:
        raise ConfigError(
            f"hidden size and number of labels must be positive, got {hidden_size}, {num_labels}"
        )
    kd_weight = alpha / num_labels
    scale = (1.0 - alpha) + kd_weight
    return kd_weight / scale, beta / (hidden_size * scale)

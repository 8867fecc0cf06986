"""pkdpipe.strategies: the seam where a strategy declares its map, targets, hyperparameters and step."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pkdpipe import strategies
from pkdpipe.config import DistillConfig
from pkdpipe.errors import ConfigError
from pkdpipe.losses import pkd_loss
from pkdpipe.strategies import StepSpec, Strategy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def student(tiny):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny["pretrained"]), num_labels=3, num_hidden_layers=3
    )
    return model.eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(5, 40, (4, 7), generator=g),
        "attention_mask": torch.ones(4, 7, dtype=torch.long),
        "labels": torch.tensor([0, 1, 2, 1]),
        "teacher_logits": torch.randn(4, 3, generator=g) * 3,
        "teacher_cls": (torch.randn(4, 2, 32, generator=g) * 5).half(),
    }


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 5.0])
@torch.no_grad()
def test_the_skip_step_uses_the_runs_temperature_and_normalisation(student, batch, normalize, temperature):
    """The step is pkd_loss on the student's [CLS] vectors of layers 1, 2 with the config's alpha,
    beta, T and normalize: a step that ignored --no-normalize or fixed T would differ here."""
    config = DistillConfig(
        strategy="skip", layers=3, alpha=0.3, beta=0.7, temperature=temperature, normalize=normalize
    )
    step = strategies.get("skip").make_step(StepSpec(config, False, [2, 4], [1, 2]))
    terms = step(student, batch)
    out = student(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
    )
    cls = torch.stack([out.hidden_states[i][:, 0] for i in (1, 2)], dim=1)
    expected = pkd_loss(
        out.logits, batch["teacher_logits"], batch["labels"], cls, batch["teacher_cls"],
        alpha=0.3, beta=0.7, temperature=temperature, normalize=normalize,
    )  # fmt: skip
    for term in ("loss", "ce", "kd", "pt"):
        torch.testing.assert_close(terms[term], expected[term], msg=term)
    other = pkd_loss(
        out.logits, batch["teacher_logits"], batch["labels"], cls, batch["teacher_cls"],
        alpha=0.3, beta=0.7, temperature=6 - temperature, normalize=not normalize,
    )  # fmt: skip
    assert abs(float(terms["kd"] - other["kd"])) > 1e-3 and abs(float(terms["pt"] - other["pt"])) > 1e-3


def test_ft_and_finetune_learn_from_the_gold_labels_alone(student, batch):
    config = DistillConfig(strategy="ft", layers=3)
    ft = strategies.get("ft").make_step(StepSpec(config, False, [], []))(student, batch)
    ce = F.cross_entropy(
        student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )
    torch.testing.assert_close(ft["loss"], ce)
    assert float(ft["kd"]) == float(ft["pt"]) == 0
    assert not strategies.get("ft").uses_logits and not strategies.get("ft").maps_layers
    finetune = strategies.finetune_step(regression=False)(student, batch)
    assert set(finetune) == {"loss"} and torch.allclose(finetune["loss"], ce)


def test_a_strategy_must_report_its_loss_first():
    with pytest.raises(ConfigError, match="must start with 'loss'"):
        strategies.register(Strategy("bad", "no loss term", ("ce",), (), lambda spec: None))
    assert "bad" not in strategies.names()


# -- a strategy from outside pkdpipe ------------------------------------------------------------------
def _cosine_step(spec: StepSpec):
    """KD on the logits plus 1 - cos between the student's and the teacher's [CLS] vectors."""

    def step(model, batch):
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        ce = F.cross_entropy(out.logits, batch["labels"])
        student = torch.stack([out.hidden_states[i][:, 0] for i in spec.student_layers], dim=1)
        cos = 1 - F.cosine_similarity(student, batch["teacher_cls"].float(), dim=-1).mean()
        return {"loss": ce + spec.config.beta * cos, "ce": ce, "cos": cos}

    return step


@pytest.fixture
def cosine():
    strategy = strategies.register(
        Strategy(
            "cosine", "CE + cosine distance on the top layer's neighbours", ("loss", "ce", "cos"), ("beta",),
            _cosine_step, uses_logits=False, pick_layers=lambda n, k: list(range(n - k + 1, n)),
        )
    )  # fmt: skip
    yield strategy
    strategies._REGISTRY.pop("cosine")


def test_a_strategy_registered_from_outside_trains_from_a_cache(cosine, tiny_cache, tmp_path, distill_config):
    """Defined here, registered through the Python API: distill, its log, its files and the report
    take it as they take the built-in ones."""
    from pkdpipe.report import loss_terms
    from pkdpipe.train import distill

    output = tmp_path / "cosine"
    result = distill(
        distill_config(tiny_cache, output, strategy="cosine", layers=3, max_steps=6, checkpoint_every=0)
    )
    records = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert (
        result.steps == 6 and train and all({"loss", "ce", "cos"} <= set(r) and "kd" not in r for r in train)
    )
    assert all(0 <= r["cos"] <= 2 for r in train)
    meta = json.loads((output / "pkdpipe_config.json").read_text())
    assert meta["layer_map"] == {"student": [1, 2], "teacher": [2, 3]}
    assert (output / "model.safetensors").is_file()
    assert loss_terms(records) == ["loss", "ce", "cos"]


# -- the built-in strategies' settings, as runs recorded them before strategies owned them ---------
# resume_settings of DistillConfig(strategy=S, layers=3, lr=1e-4, beta=0.1), as pkdpipe wrote them
RECORDED = {
    "task": "", "lr": 0.0001, "epochs": 4, "batch_size": 32, "warmup": 0.1, "weight_decay": 0.01,
    "max_grad_norm": 1.0, "seed": 42, "eval_every": 0, "precision": "fp32", "max_steps": 0,
    "group_by_length": False, "layers": 3, "teacher_layers": None, "student_init": None, "alpha": 0.5,
    "beta": 0.1, "temperature": 10.0, "normalize": True, "pt_space": "raw", "cache_key": "k",
}  # fmt: skip


@pytest.mark.parametrize("name", ["ft", "kd", "last", "skip"])
def test_the_built_in_strategies_name_and_resume_runs_as_before(name):
    """Run folders and checkpoints of earlier runs keep their names and still match: every built-in
    strategy records all five settings of the paper's objective, though ft and kd read fewer."""
    from pkdpipe.loop import resume_settings
    from pkdpipe.sweep import grid_settings, run_name

    space = "centered" if name == "skip" else "raw"
    config = DistillConfig(strategy=name, layers=3, lr=1e-4, beta=0.1, pt_space=space)
    assert resume_settings(config, cache_key="k") == {**RECORDED, "strategy": name, "pt_space": space}
    suffix = "_centered" if name == "skip" else ""
    assert run_name(grid_settings(config)) == f"{name}-3_a0.5_b0.1_t10_lr0.0001_s42{suffix}"
    assert strategies.get(name).hyperparameters == {
        "ft": (), "kd": ("alpha", "temperature")
    }.get(name, ("alpha", "beta", "temperature", "normalize", "pt_space"))  # fmt: skip

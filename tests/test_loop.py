"""pkdpipe.loop: the training loop's parts (the log, the best model, the optimizer) on toy models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pkdpipe.loop import _truncate_log, fit, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resuming_drops_log_lines_past_the_checkpoint_and_a_line_cut_by_the_kill(tmp_path):

    log = tmp_path / "train_log.jsonl"
    lines = ['{"step": 10, "loss": 1}', '{"step": 12, "dev_accuracy": 1}', '{"step": 20, "loss": 0}', '{"st']
    log.write_text("\n".join(lines))
    _truncate_log(log, 12)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [10, 12]


class _TwoBatches:
    def steps_per_epoch(self):
        return 2

    def epoch(self, epoch, skip):
        for _ in range(2 - skip):
            yield {"x": torch.ones(4, 3)}


def _fit_toy(output, scores, save_final, epochs=2):
    """fit on a 3-weight model whose dev scores are given; one checkpoint at the end of each epoch."""
    from pkdpipe.config import TrainConfig

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    config = TrainConfig(epochs=epochs, lr=0.1, device="cpu", checkpoint_every=0, quiet=True)
    step = lambda m, b: {"loss": m(b["x"]).pow(2).mean()}  # noqa: E731
    fit(
        model,
        _TwoBatches(),
        step,
        lambda m: {"accuracy": next(scores)},
        config,
        output,
        "accuracy",
        save_final,
    )


def _saving(saved: list):
    from safetensors.torch import save_file

    def save_final(model, folder):
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"w": model.weight.detach().clone()}, str(folder / "model.safetensors"))
        saved.append(model.weight.detach().clone())

    return save_final


def test_a_kill_while_writing_a_new_best_leaves_the_previous_best_whole(tmp_path):
    saved = []
    save = _saving(saved)

    def killed_on_the_second_best(model, folder):
        if saved:  # killed halfway through writing the weights
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model.safetensors").write_bytes(b"\0" * 10)
            raise KeyboardInterrupt
        save(model, folder)

    with pytest.raises(KeyboardInterrupt):
        _fit_toy(tmp_path, iter([0.5, 0.9]), killed_on_the_second_best)
    assert load_file(str(tmp_path / "best" / "model.safetensors"))["w"].equal(saved[0])


def test_a_kill_between_the_renames_of_a_new_best_is_undone_on_resume(tmp_path, monkeypatch):
    from pathlib import Path

    saved = []
    real_rename = Path.rename

    def rename(self, target):
        if self.name == "best.partial" and (self.parent / "best.old").exists():  # the second best
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        _fit_toy(tmp_path, iter([0.5, 0.9]), _saving(saved))
    assert not (tmp_path / "best").exists() and (tmp_path / "best.old").is_dir()

    monkeypatch.setattr(Path, "rename", real_rename)
    _fit_toy(tmp_path, iter([0.3]), _saving(saved))  # resumes from epoch 1's checkpoint; no better
    assert load_file(str(tmp_path / "model.safetensors"))["w"].equal(saved[0])
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "train_log.jsonl"}


def test_a_fresh_start_drops_an_earlier_runs_best(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "tokenizer.json").write_text("{}")  # from a killed run with other settings
    saved = []
    _fit_toy(tmp_path, iter([0.5, 0.4]), _saving(saved))
    assert not (tmp_path / "tokenizer.json").exists()
    assert load_file(str(tmp_path / "model.safetensors"))["w"].equal(saved[0])


# -- the optimizer -------------------------------------------------------------------------------
def test_the_fused_adamw_trains_to_the_weights_of_torchs_default_adamw(tiny):
    """pkdpipe takes torch's fused AdamW on CPU (several times faster than the per-tensor loop);
    over 300 steps on a real student's gradients its weights stay within float rounding of the
    default AdamW with the same groups."""
    import copy

    from transformers import AutoModelForSequenceClassification

    from pkdpipe.config import TrainConfig

    torch.manual_seed(0)
    fused_model = AutoModelForSequenceClassification.from_pretrained(str(tiny["pretrained"]), num_labels=3)
    fused_model.eval()  # no dropout: both models see the same function
    plain_model = copy.deepcopy(fused_model)
    config = TrainConfig(lr=1e-3, weight_decay=0.01)
    fused = make_optimizer(fused_model, config)
    groups = [
        {"params": g["params"], "weight_decay": g["weight_decay"]}
        for g in make_optimizer(plain_model, config).param_groups
    ]
    plain = torch.optim.AdamW(groups, lr=config.lr, foreach=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    assert [g["weight_decay"] for g in fused.param_groups] == [0.01, 0.0]

    for _ in range(300):
        ids = torch.randint(5, 40, (8, 12))
        labels = torch.randint(0, 3, (8,))
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # and they did train: the weights moved far more than that tolerance
    start = AutoModelForSequenceClassification.from_pretrained(str(tiny["pretrained"]), num_labels=3)
    moved = (
        fused_model.bert.encoder.layer[0].output.dense.weight
        - start.bert.encoder.layer[0].output.dense.weight
    )
    assert moved.abs().max() > 1e-2

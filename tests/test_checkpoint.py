"""pkdpipe.checkpoint: a resumable training state in safetensors and JSON, swapped in whole."""

from __future__ import annotations

import json

import pytest
import torch

from pkdpipe import checkpoint
from pkdpipe.errors import PkdError
from pkdpipe.loop import make_scheduler


def _setup(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return model, optimizer, make_scheduler(optimizer, total_steps=20, warmup=0.1)


def _train(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(16, 4)
        loss = torch.nn.functional.dropout(model(x), p=0.5).pow(2).mean()  # uses the RNG, like dropout
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_save_and_load_continue_exactly_like_an_uninterrupted_run(tmp_path):
    model, optimizer, scheduler = _setup(0)
    _train(model, optimizer, scheduler, 5)
    checkpoint.save(tmp_path / "checkpoint", model, optimizer, scheduler, {"step": 5, "epoch": 0})
    _train(model, optimizer, scheduler, 5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    fresh, fresh_optimizer, fresh_scheduler = _setup(1)  # other weights, other RNG position
    assert checkpoint.exists(tmp_path / "checkpoint")
    state = checkpoint.load(tmp_path / "checkpoint", fresh, fresh_optimizer, fresh_scheduler)
    assert state == {"step": 5, "epoch": 0}
    _train(fresh, fresh_optimizer, fresh_scheduler, 5)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_no_pickle_in_a_checkpoint(tmp_path):
    model, optimizer, scheduler = _setup(0)
    _train(model, optimizer, scheduler, 1)
    checkpoint.save(tmp_path / "c", model, optimizer, scheduler, {"step": 1})
    assert {p.suffix for p in (tmp_path / "c").iterdir()} == {".safetensors", ".json"}
    json.loads((tmp_path / "c" / "state.json").read_text())


def test_a_kill_between_the_renames_keeps_the_old_checkpoint(tmp_path):
    model, optimizer, scheduler = _setup(0)
    folder = tmp_path / "checkpoint"
    checkpoint.save(folder, model, optimizer, scheduler, {"step": 3})
    folder.rename(tmp_path / "checkpoint.old")  # what a kill after the first rename in `save` leaves
    assert checkpoint.exists(folder)
    assert checkpoint.load(folder, *_setup(1)) == {"step": 3}
    checkpoint.remove(folder)
    assert not any(tmp_path.iterdir())
    assert not checkpoint.exists(folder)


def test_a_damaged_checkpoint_says_how_to_start_over(tmp_path):
    model, optimizer, scheduler = _setup(0)
    folder = tmp_path / "checkpoint"
    checkpoint.save(folder, model, optimizer, scheduler, {"step": 3})
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PkdError, match="cannot resume from .*delete it to start over"):
        checkpoint.load(folder, model, optimizer, scheduler)


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    model, optimizer, scheduler = _setup(0)
    checkpoint.save(tmp_path / "c", model, optimizer, scheduler, {"step": 1})
    other = torch.nn.Linear(4, 2)
    other_optimizer = torch.optim.AdamW(other.parameters())
    with pytest.raises(PkdError, match="cannot resume from") as err:
        checkpoint.load(tmp_path / "c", other, other_optimizer, make_scheduler(other_optimizer, 10, 0.1))
    assert "\n" not in str(err.value)

"""pkdpipe.models: any Hugging Face encoder, not just BERT. MPNet (the 12-layer teacher of issue 14 is
one) differs in ways the pipeline must absorb in the model layer: no token type ids, <s> as [CLS],
pad id 1 and positions numbered from it, relative position buckets."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_tiny_mpnet

from pkdpipe.config import CacheConfig, DistillConfig, FinetuneConfig
from pkdpipe.models import max_input_length
from pkdpipe.teacher import cache_teacher
from pkdpipe.train import distill, finetune

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mpnet_teacher_cache_and_students_end_to_end(tiny, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, pipeline

    pretrained = write_tiny_mpnet(tmp_path / "mpnet")
    assert max_input_length(AutoConfig.from_pretrained(pretrained)) == 128
    finetune(FinetuneConfig(task=tiny["task"], model=str(pretrained), output=tmp_path / "teacher",
                            epochs=1, batch_size=16, lr=1e-3, device="cpu", quiet=True))  # fmt: skip
    cache = cache_teacher(
        CacheConfig(
            task=tiny["task"], teacher=str(tmp_path / "teacher"), cache_dir=tmp_path / "c", quiet=True
        )
    )
    m = cache.manifest
    assert m.teacher.model_type == "mpnet" and m.layers == [0, 1, 2, 3, 4] and m.uses_token_type_ids is False
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    from pkdpipe.cache.reader import open_cache

    with open_cache(cache.path) as opened:
        rows = opened.read("train")
    assert rows["token_type_ids"] is None
    assert all(
        ids[0] == tokenizer.cls_token_id == 0 and ids[-1] == tokenizer.sep_token_id
        for ids in rows["input_ids"]
    )

    for strategy, layers, teacher_layers in (("skip", 2, [2]), ("last", 3, [2, 3])):
        output = tmp_path / strategy
        distill(DistillConfig(cache=str(cache.path), strategy=strategy, layers=layers, output=output,
                              epochs=1, batch_size=8, lr=1e-3, device="cpu", quiet=True))  # fmt: skip
        meta = json.loads((output / "pkdpipe_config.json").read_text())
        assert meta["layer_map"]["teacher"] == teacher_layers
        model = AutoModelForSequenceClassification.from_pretrained(output)
        assert model.config.model_type == "mpnet" and model.config.num_hidden_layers == layers
        with torch.no_grad():
            batch = AutoTokenizer.from_pretrained(output)(
                ["the film was great", "dull"], padding=True, return_tensors="pt"
            )
            assert model(**batch).logits.shape == (2, 3)
        (prediction,) = pipeline("text-classification", model=str(output), device="cpu")("the film was great")
        assert prediction["label"] in ("neg", "neu", "pos")

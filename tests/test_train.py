"""pkdpipe.train: `distill` from the cache alone (init, strategies, outputs, checks) and `finetune`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import LABELS, write_tiny_bert
from safetensors.torch import load_file

from pkdpipe.cache.reader import open_cache
from pkdpipe.config import CacheConfig, FinetuneConfig
from pkdpipe.errors import CacheError, ConfigError, ModelError, PkdError
from pkdpipe.runfolder import FINETUNE_RECORD
from pkdpipe.strategies import layer_map
from pkdpipe.teacher import cache_teacher
from pkdpipe.train import _student, distill, finetune

pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_TERMS = ("loss", "ce", "kd", "pt")


def _log(output) -> list[dict]:
    return [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]


def _train_lines(output) -> list[dict]:
    return [r for r in _log(output) if "loss" in r]


def _tokenizer_files(tmp_path, pretrained) -> set[str]:
    """What save_pretrained writes for the tiny tokenizer with this transformers version."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tokenizer-files"
    AutoTokenizer.from_pretrained(str(pretrained)).save_pretrained(str(folder))
    return {p.name for p in folder.iterdir()}


# -- the student starts from the pre-trained model -----------------------------------------------
@pytest.mark.parametrize("k", [2, 3])
def test_student_takes_the_first_k_layers_and_embeddings_of_the_init(
    tiny, tiny_cache, tmp_path, distill_config, k
):
    from transformers import AutoModel

    config = distill_config(tiny_cache, tmp_path / "unused", layers=k)
    with open_cache(tiny_cache) as cache:
        teacher_map = layer_map("skip", cache.teacher_layers, k)
        student, _ = _student(str(tiny["pretrained"]), config, cache, teacher_map)
    pretrained = AutoModel.from_pretrained(str(tiny["pretrained"])).state_dict()
    body = student.base_model.state_dict()

    assert student.config.num_hidden_layers == k
    assert {key.split(".")[2] for key in body if key.startswith("encoder.layer.")} == {
        str(i) for i in range(k)
    }
    for key, value in body.items():
        torch.testing.assert_close(value, pretrained[key], rtol=0, atol=0, msg=key)
    assert any(key.startswith("embeddings.") for key in body)

    # a fresh classifier with the task's labels, not the teacher's fine-tuned head
    teacher_head = load_file(str(tiny["teacher"] / "model.safetensors"))["classifier.weight"]
    assert student.classifier.weight.shape == teacher_head.shape == (3, 32)
    assert not torch.allclose(student.classifier.weight, teacher_head)
    assert student.config.id2label == dict(enumerate(LABELS))


# -- a full distill run --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def skip_run(one_thread, tiny_cache, tmp_path_factory, distill_config):
    """A 2-layer PKD-Skip student over 3 epochs (36 steps), checkpointing on the way."""
    output = tmp_path_factory.mktemp("distill") / "student"
    config = distill_config(tiny_cache, output, epochs=3, checkpoint_every=5)
    return config, distill(config), output


def test_distill_lowers_the_loss(skip_run):
    _, result, output = skip_run
    lines = _train_lines(output)
    assert result.steps == 36 and lines[-1]["step"] == 36
    assert lines[-1]["loss"] < 0.9 * lines[0]["loss"]
    assert lines[-1]["pt"] < 0.5 * lines[0]["pt"]  # the patient term is what 36 tiny steps move most


def test_distill_writes_exactly_the_run_files(skip_run, tiny, tmp_path):
    _, _, output = skip_run
    expected = {"config.json", "model.safetensors", "pkdpipe_config.json", "metrics.json", "train_log.jsonl"}
    expected |= {"README.md"} | _tokenizer_files(tmp_path, tiny["pretrained"])
    assert {p.name for p in output.iterdir()} == expected  # no checkpoint/, best/, *.tmp left


def test_training_log_has_every_loss_term_and_dev_metrics(skip_run):
    _, _, output = skip_run
    records = _log(output)
    train = [r for r in records if "loss" in r]
    dev = [r for r in records if "dev_accuracy" in r]
    assert train and all({"step", "lr", *LOSS_TERMS} <= set(r) for r in train)
    assert [r["step"] for r in train] == [10, 20, 30, 36]
    assert [r["step"] for r in dev] == [12, 24, 36]  # one per epoch
    assert all(0 <= r["dev_accuracy"] <= 1 for r in dev)
    assert all(r["pt"] > 0 and r["kd"] >= 0 and r["lr"] > 0 for r in train)


def test_run_files_record_the_config_metrics_and_map(skip_run, tiny, tiny_cache):
    config, result, output = skip_run
    manifest = json.loads((tiny_cache / "manifest.json").read_text())
    meta = json.loads((output / "pkdpipe_config.json").read_text())
    assert meta["layer_map"] == {"student": [1], "teacher": [2]}
    assert meta["cache"]["key"] == manifest["key"]
    assert meta["student_init"] == str(tiny["pretrained"])
    assert (
        meta["config"]["strategy"] == "skip"
        and meta["config"]["lr"] == 1e-3
        and meta["config"]["layers"] == 2
    )

    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["dev"] == result.metrics and "accuracy" in metrics["dev"]
    assert metrics["steps"] == 36 and metrics["best_step"] == result.best_step
    assert metrics["parameters"] > 0

    assert json.loads((output / "config.json").read_text())["num_hidden_layers"] == 2


def test_model_card_names_teacher_cache_strategy_map_and_metrics(skip_run, tiny, tiny_cache):
    """A card a hub user accepts: a metadata header with the results, names that are not this
    machine's paths, and only the hyperparameters the strategy uses."""
    _, result, output = skip_run
    card = (output / "README.md").read_text()
    key = json.loads((tiny_cache / "manifest.json").read_text())["key"]
    header = card.split("---")[1]
    for text in ("library_name: transformers", "pipeline_tag: text-classification", "metrics: [accuracy]",
                 "model-index:", f"value: {result.metrics['accuracy']:.4f}, name: dev accuracy"):  # fmt: skip
        assert text in header, text
    for text in ("/teacher`, a local folder", key, "skip", "1<-2", "| lr | 0.001 |", "| alpha | 0.5 |",
                 "| temperature |", f"| dev | {100 * result.metrics['accuracy']:.2f} |",
                 "dev, the teacher"):  # fmt: skip
        assert text in card, text
    assert str(tiny["root"]) not in card and "/tmp" not in card


def test_saved_student_loads_in_plain_transformers(skip_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    _, _, output = skip_run
    model = AutoModelForSequenceClassification.from_pretrained(output)
    assert model.config.id2label == dict(enumerate(LABELS))
    assert model.config.label2id == {name: i for i, name in enumerate(LABELS)}
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert model(**tokenizer(["the film was great"], return_tensors="pt")).logits.shape == (1, 3)

    classify = pipeline("text-classification", model=str(output), device="cpu")
    (prediction,) = classify("the film was great")
    assert prediction["label"] in LABELS


# -- strategies ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("strategy", "teacher_layers"), [("ft", []), ("kd", []), ("last", [3]), ("skip", [2])]
)
def test_strategies_use_their_loss_terms(tiny_cache, tmp_path, distill_config, strategy, teacher_layers):
    output = tmp_path / strategy
    distill(distill_config(tiny_cache, output, strategy=strategy, max_steps=4, checkpoint_every=0))
    (last,) = [r for r in _train_lines(output) if r["step"] == 4]
    if strategy == "ft":
        assert last["kd"] == 0 and last["pt"] == 0 and last["loss"] == pytest.approx(last["ce"])
    elif strategy == "kd":
        assert last["kd"] > 0 and last["pt"] == 0
    else:
        assert last["kd"] > 0 and last["pt"] > 0
    meta = json.loads((output / "pkdpipe_config.json").read_text())
    assert meta["layer_map"]["teacher"] == teacher_layers
    card = (output / "README.md").read_text()
    assert "| strategy | " + strategy in card
    assert ("| alpha |" in card) == (strategy != "ft")  # a card lists the hyperparameters its strategy uses


def test_explicit_teacher_layers_are_recorded(tiny_cache, tmp_path, distill_config):
    output = tmp_path / "explicit"
    config = distill_config(tiny_cache, output, strategy="last", layers=3, teacher_layers=(1, 3), max_steps=2)
    distill(config)
    meta = json.loads((output / "pkdpipe_config.json").read_text())
    assert meta["layer_map"] == {"student": [1, 2], "teacher": [1, 3]}
    assert "1<-1, 2<-3" in (output / "README.md").read_text()


# -- the teacher is never loaded -----------------------------------------------------------------
def test_distill_works_with_the_teacher_deleted(tiny, tmp_path, distill_config):
    teacher = tmp_path / "teacher-copy"
    shutil.copytree(tiny["teacher"], teacher)
    built = cache_teacher(
        CacheConfig(task=tiny["task"], teacher=str(teacher), cache_dir=tmp_path / "caches", quiet=True)
    )
    assert built.manifest["teacher"]["pretrained_from"] == str(tiny["pretrained"])
    shutil.rmtree(teacher)

    output = tmp_path / "student"
    result = distill(distill_config(built.path, output, max_steps=3))
    assert result.steps == 3 and (output / "model.safetensors").is_file()
    meta = json.loads((output / "pkdpipe_config.json").read_text())
    assert meta["student_init"] == str(tiny["pretrained"])
    assert meta["cache"]["teacher"]["name_or_path"] == str(teacher)


# -- the cache must fit the student: one clear line each -----------------------------------------
def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert isinstance(err.value, PkdError) and "\n" not in message
    return message


def _other_vocab_bert(folder, pretrained):
    """The tiny pre-trained encoder with one vocabulary entry renamed: a different tokenizer."""
    from transformers import AutoTokenizer

    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(pretrained / name, folder / name)
    vocab = (pretrained / "vocab.txt").read_text() if (pretrained / "vocab.txt").is_file() else None
    if vocab is None:
        tokenizer = AutoTokenizer.from_pretrained(str(pretrained))
        vocab = "\n".join(sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)) + "\n"
    (folder / "vocab.txt").write_text(vocab.replace("\nawful\n", "\nawfully\n"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512})
    )
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    return folder


def test_a_student_with_another_tokenizer_is_refused(tiny, tiny_cache, tmp_path, distill_config):
    init = _other_vocab_bert(tmp_path / "other-vocab", tiny["pretrained"])
    with pytest.raises(CacheError) as err:
        distill(distill_config(tiny_cache, tmp_path / "out", student_init=str(init)))
    assert "tokenizer" in _one_line(err) and "not the one the cache was made with" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_student_of_another_width_needs_strategy_kd(tiny, tiny_cache, tmp_path, distill_config):
    wide = write_tiny_bert(tmp_path / "wide", layers=2, hidden=48)
    with pytest.raises(ModelError) as err:
        distill(distill_config(tiny_cache, tmp_path / "skip", student_init=str(wide)))
    assert "hidden size 48 differs from the teacher's 32" in _one_line(err)
    assert "--strategy kd" in str(err.value)

    result = distill(
        distill_config(tiny_cache, tmp_path / "kd", student_init=str(wide), strategy="kd", max_steps=2)
    )
    assert result.steps == 2
    assert json.loads((tmp_path / "kd" / "config.json").read_text())["hidden_size"] == 48


def test_layers_the_map_needs_must_be_in_the_cache(tiny, tmp_path, distill_config):
    built = cache_teacher(
        CacheConfig(
            task=tiny["task"], teacher=str(tiny["teacher"]), cache_dir=tmp_path, layers=(0, 1), quiet=True
        )
    )
    # 4 -> 3 skip maps student layers 1, 2 onto teacher layers 1, 3; layer 3 is not stored
    with pytest.raises(CacheError) as err:
        distill(distill_config(built.path, tmp_path / "out", layers=3))
    assert "does not store teacher layer(s) [3]" in _one_line(err)
    assert not (tmp_path / "out").exists()  # refused before any training
    # a map inside the stored layers works: 4 -> 2 with teacher layer 1
    result = distill(distill_config(built.path, tmp_path / "ok", teacher_layers=(1,), max_steps=2))
    assert result.steps == 2


def test_the_student_must_be_shallower_than_the_teacher(tiny_cache, tmp_path, distill_config):
    with pytest.raises(ConfigError) as err:
        distill(distill_config(tiny_cache, tmp_path / "out", layers=4))
    assert "K=4 is not below the teacher's 4 layers" in _one_line(err)


def test_explicit_teacher_layers_must_have_k_minus_1_entries(tiny_cache, tmp_path, distill_config):
    with pytest.raises(ConfigError) as err:
        distill(distill_config(tiny_cache, tmp_path / "out", layers=3, teacher_layers=(1, 2, 3)))
    assert "needs K-1 = 2 layers, got 3" in _one_line(err)


def test_no_cache_under_the_root(tmp_path, distill_config):
    config = distill_config(None, tmp_path / "out", cache_dir=tmp_path / "empty-root")
    with pytest.raises(CacheError) as err:
        distill(config)
    assert "no complete cache under" in _one_line(err) and str(tmp_path / "empty-root") in str(err.value)


def test_the_newest_cache_under_the_root_is_the_default(tiny_cache, tmp_path, distill_config):
    config = distill_config(None, tmp_path / "out", cache_dir=tiny_cache.parent.parent, max_steps=1)
    assert distill(config).steps == 1
    meta = json.loads((tmp_path / "out" / "pkdpipe_config.json").read_text())
    assert meta["cache"]["path"] == str(tiny_cache)


# -- finetune ------------------------------------------------------------------------------------
def test_finetune_writes_a_model_that_records_its_base(tiny, tmp_path):
    output = tmp_path / "teacher"
    config = FinetuneConfig(
        task=tiny["task"],
        model=str(tiny["pretrained"]),
        output=output,
        epochs=1,
        batch_size=16,
        lr=1e-3,
        device="cpu",
        quiet=True,
    )
    result = finetune(config)
    record = json.loads((output / FINETUNE_RECORD).read_text())
    assert record["base_model"] == str(tiny["pretrained"]) and record["layers"] is None
    metrics = json.loads((output / "metrics.json").read_text())
    assert "accuracy" in metrics["dev"] and metrics["steps"] == result.steps == 6
    model_config = json.loads((output / "config.json").read_text())
    assert model_config["num_hidden_layers"] == 4
    assert model_config["id2label"] == {str(i): name for i, name in enumerate(LABELS)}
    assert not (output / "checkpoint").exists() and not (output / "best").exists()
    card = (output / "README.md").read_text()  # a teacher gets a card too
    assert "# tiny: teacher" in card and "name: dev accuracy" in card and str(tmp_path) not in card


# -- the batch order: as fast as a plain loop ----------------------------------------------------
@pytest.fixture(scope="module")
def length_task(tmp_path_factory, tiny):
    """A 3-label task whose label goes with the length (1-3, 5-8 or 10-14 filler words, a sentiment
    word that is right only half the time): stored length-sorted, as caches store rows, an order
    that kept batches at one length would feed the student one label at a time."""
    import csv
    import random

    from conftest import _FILLER, _WORDS

    root = tmp_path_factory.mktemp("length-task")
    rng = random.Random(5)
    spans = {"neg": (1, 3), "neu": (5, 8), "pos": (10, 14)}
    for split, n in (("train", 192), ("dev", 60)):
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for i in range(n):
                label, other = LABELS[i % 3], LABELS[(i + 1) % 3]
                words = [rng.choice(_FILLER) for _ in range(rng.randint(*spans[label]))]
                words.insert(rng.randrange(len(words) + 1), rng.choice(_WORDS[label] + _WORDS[other]))
                writer.writerow([" ".join(words), label])
    (root / "task.toml").write_text(
        'name = "lengths"\ntext_fields = ["text"]\nlabel_field = "label"\n'
        f'labels = {json.dumps(LABELS)}\nmetric = "accuracy"\n[files]\ntrain = "train.csv"\ndev = "dev.csv"\n'
    )
    return root / "task.toml"


def _plain_loop_accuracy(task_file, pretrained, seed: int) -> float:
    """Dev accuracy of an ordinary loop with finetune's settings: a fresh uniform shuffle each epoch."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    from pkdpipe.data import load_split
    from pkdpipe.tasks import get_task

    task, tokenizer = get_task(str(task_file)), AutoTokenizer.from_pretrained(str(pretrained))
    train, dev = load_split(task, "train"), load_split(task, "dev")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(pretrained), num_labels=3, num_hidden_layers=3
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, 7, 72)
    labels, order = torch.tensor(train.labels), torch.Generator().manual_seed(seed)
    for _ in range(3):
        for rows in torch.randperm(len(labels), generator=order).split(8):
            batch = tokenizer([train.text_a[i] for i in rows], padding=True, return_tensors="pt")
            model(**batch, labels=labels[rows]).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step(), scheduler.step(), optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        predicted = model(**tokenizer(dev.text_a, padding=True, return_tensors="pt")).logits.argmax(-1)
    return float((predicted == torch.tensor(dev.labels)).float().mean())


def test_finetune_and_distill_learn_as_fast_as_a_plain_uniform_loop(length_task, tiny, tmp_path):
    """Three epochs on the length task: pkdpipe's finetune (batches from memory) and distill
    --strategy ft (batches from a length-sorted cache) reach the dev accuracy of a plain loop,
    where the blocked order they had before stayed at chance (0.33) on every seed."""
    from conftest import write_tiny_teacher

    from pkdpipe.config import DistillConfig

    settings = {
        "layers": 3,
        "epochs": 3,
        "batch_size": 8,
        "lr": 1e-3,
        "device": "cpu",
        "quiet": True,
        "checkpoint_every": 0,
    }
    teacher = write_tiny_teacher(tmp_path / "teacher", tiny["pretrained"])
    cache = cache_teacher(
        CacheConfig(task=str(length_task), teacher=str(teacher), cache_dir=tmp_path / "cache", quiet=True)
    )
    for seed in (1, 2):
        plain = _plain_loop_accuracy(length_task, tiny["pretrained"], seed)
        tuned = finetune(
            FinetuneConfig(
                task=str(length_task),
                model=str(tiny["pretrained"]),
                output=tmp_path / f"ft{seed}",
                seed=seed,
                **settings,
            )
        )
        distilled = distill(
            DistillConfig(
                cache=str(cache.path),
                strategy="ft",
                student_init=str(tiny["pretrained"]),
                output=tmp_path / f"distill{seed}",
                seed=seed,
                **settings,
            )
        )
        assert plain > 0.55, "the task is learnable in three epochs"
        assert tuned.metrics["accuracy"] >= plain - 0.1, (seed, plain, tuned.metrics)
        assert distilled.metrics["accuracy"] >= plain - 0.1, (seed, plain, distilled.metrics)


def _plain_distill_weights(cache_path, init, strategy: str, seed: int, steps: int, keep: int) -> dict:
    """The reference: a loop written out here, with the paper's objective, over the batches of
    `plan_epoch(seed, epoch)` from the cache's rows, AdamW without fusing, warm-up over the first
    10% of `steps`; the weights after step `keep`."""
    import math

    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification

    from pkdpipe.batching import plan_epoch

    teacher_layers = [2] if strategy == "skip" else []
    with open_cache(cache_path) as cache:
        data = cache.read("train", teacher_layers)
    ids = [torch.from_numpy(x.astype("int64")) for x in data["input_ids"]]
    labels, logits = torch.from_numpy(data["labels"]), torch.from_numpy(data["logits"]).float()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(init), num_labels=3, num_hidden_layers=2)
    torch.manual_seed(seed)  # dropout's stream, as distill seeds it
    model.train()
    plain = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
    decayed = [p for n, p in model.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": 0.01}, {"params": plain, "weight_decay": 0.0}], lr=1e-3
    )
    warmup = int(0.1 * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: (k + 1) / warmup if k < warmup else (steps - k) / (steps - warmup)
    )
    epoch, done, kept = 0, 0, None
    while done < steps:
        for rows in plan_epoch(len(ids), 8, seed, epoch)[: steps - done]:
            batch = torch.nn.utils.rnn.pad_sequence([ids[r] for r in rows], batch_first=True)
            out = model(input_ids=batch, attention_mask=(batch != 0).long(), output_hidden_states=True)
            loss = F.cross_entropy(out.logits, labels[rows])
            if strategy != "ft":  # alpha 0.5, T 2, beta 0.5
                kd = F.kl_div(
                    F.log_softmax(out.logits / 2, -1), F.softmax(logits[rows] / 2, -1), reduction="batchmean"
                )
                loss = 0.5 * loss + 0.5 * 4 * kd
            if strategy == "skip":
                student = F.normalize(out.hidden_states[1][:, 0], dim=-1)
                teacher = F.normalize(torch.from_numpy(data["hidden"][rows, 0]).float(), dim=-1)
                loss = loss + 0.5 * (student - teacher).pow(2).sum(-1).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step(), schedule.step(), optimizer.zero_grad()
            done += 1
            if done == keep:
                kept = {name: value.clone() for name, value in model.state_dict().items()}
        epoch += 1
    assert math.isfinite(loss.item())
    return kept


@pytest.mark.parametrize("strategy", ["ft", "kd", "skip"])
def test_distill_is_step_for_step_a_plain_loop_over_the_same_batches(
    tiny, tiny_cache, tmp_path, distill_config, strategy
):
    """What bench_parity.py compares on BANKING77, made exact: given the same batch order, the same
    initial weights and the same seeds, the best of distill's two epochs (evaluations, best models
    and checkpoints on the way) is the plain loop's weights at that step, to float rounding (fused
    AdamW against unfused). Any
    change to the learning path (order, objective, schedule, clipping, decay groups, dropout
    seeding) breaks this, as the blocked order did."""
    output = tmp_path / strategy
    config = distill_config(
        tiny_cache,
        output,
        strategy=strategy,
        epochs=2,
        alpha=0.5,
        beta=0.5,
        temperature=2.0,
        student_init=str(tiny["pretrained"]),
        checkpoint_every=5,
        seed=3,
    )
    result = distill(config)
    ours = load_file(str(output / "model.safetensors"))
    assert result.steps == 24 and result.best_step in (12, 24)
    plain = _plain_distill_weights(tiny_cache, tiny["pretrained"], strategy, 3, 24, keep=result.best_step)
    assert set(ours) <= set(plain)
    for name, value in ours.items():
        torch.testing.assert_close(value, plain[name], rtol=0, atol=2e-5, msg=name)


def test_evaluate_record_adds_a_split_to_the_card(skip_run, tiny, tmp_path):
    from pkdpipe.config import EvaluateConfig
    from pkdpipe.evaluate import evaluate

    _, _, output = skip_run
    student = tmp_path / "student"
    shutil.copytree(output, student)
    (report,) = evaluate(EvaluateConfig(models=[str(student)], task=tiny["task"], split="test", record=True))
    assert json.loads((student / "eval_results.json").read_text()) == {"test": report.metrics}
    card = (student / "README.md").read_text()
    assert f"| test | {100 * report.metrics['accuracy']:.2f} |" in card and "name: test accuracy" in card


# -- the patient loss where examples differ -------------------------------------------------------
def test_a_raw_map_onto_layers_that_barely_vary_is_flagged(planted_cache, tmp_path, distill_config):
    """Layer 2 of the planted cache is one vector for every example: the paper's patient loss
    there teaches nothing about the input, and the run says so, with the figure and what to try."""
    output = tmp_path / "raw"
    result = distill(distill_config(planted_cache, output, strategy="skip", layers=2, max_steps=2))
    (warning,) = [w for w in result.warnings if "little to teach" in w]
    assert "teacher layer(s) 2: " in warning and "--pt-space relational" in warning
    assert planted_cache.name in warning  # the cache stats command to run names this cache
    assert warning in json.loads((output / "metrics.json").read_text())["warnings"]
    signal = json.loads((output / "pkdpipe_config.json").read_text())["layer_signal"]
    assert list(signal) == ["2"] and signal["2"] < 1e-4
    card = (output / "README.md").read_text()
    assert "per-example share of the mapped teacher layers' normalised [CLS] (train): layer 2: " in card


def test_a_standardised_patient_loss_trains_from_the_cache_and_is_recorded(
    planted_cache, tmp_path, distill_config
):
    output = tmp_path / "standardized"
    config = distill_config(
        planted_cache, output, strategy="skip", layers=2, pt_space="standardized", max_steps=4
    )
    result = distill(config)
    assert not [w for w in result.warnings if "little to teach" in w]
    meta = json.loads((output / "pkdpipe_config.json").read_text())
    assert meta["config"]["pt_space"] == "standardized"
    assert "| pt_space | standardized |" in (output / "README.md").read_text()
    (last,) = [r for r in _train_lines(output) if r["step"] == 4]
    # the planted dimension is gone from the target: PT is no longer a near-match of one direction
    assert 0.5 < last["pt"] < 4


def test_the_step_standardises_the_target_with_the_caches_statistics(planted_cache, tmp_path, distill_config):
    """The step's PT equals patient_loss with the cache's train mean and std of the mapped layer."""
    from pkdpipe.losses import patient_loss
    from pkdpipe.models import cls_vectors
    from pkdpipe.strategies import StepSpec, get

    config = distill_config(
        planted_cache, tmp_path / "unused", strategy="skip", layers=2, pt_space="standardized"
    )
    with open_cache(planted_cache) as cache:
        stats = cache.layer_stats("train", [2])
        student, _ = _student(str(cache.manifest.teacher.pretrained_from), config, cache, [2])
        batch = next(cache.stream("train", 8, [2], epoch=0, seed=1))
    tensors = {
        "input_ids": torch.nn.utils.rnn.pad_sequence(
            [torch.as_tensor(x).long() for x in batch["input_ids"]], True
        ),
        "labels": torch.as_tensor(batch["labels"]),
        "teacher_logits": torch.as_tensor(batch["logits"]),
        "teacher_cls": torch.as_tensor(batch["hidden"]),
    }
    tensors["attention_mask"] = (tensors["input_ids"] != 0).long()
    student.eval()
    step = get("skip").make_step(StepSpec(config, False, [2], [1], stats))
    terms = step(student, tensors)
    out = student(
        input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"], output_hidden_states=True
    )
    mean = torch.from_numpy(stats[2].mean).float()[None]
    std = torch.from_numpy(stats[2].std).float()[None]
    expected = patient_loss(
        cls_vectors(out.hidden_states, [1]), tensors["teacher_cls"], True, "standardized", mean, std
    )
    torch.testing.assert_close(terms["pt"], expected)


def test_an_auto_map_takes_the_layers_that_vary_most(planted_cache, tmp_path, distill_config):
    with open_cache(planted_cache) as cache:
        shares = {layer: s.varying_share for layer, s in cache.layer_stats("train", [1, 2, 3]).items()}
    assert min(shares, key=shares.get) == 2  # the planted layer
    output = tmp_path / "auto"
    distill(
        distill_config(planted_cache, output, strategy="last", layers=3, teacher_layers="auto", max_steps=2)
    )
    meta = json.loads((output / "pkdpipe_config.json").read_text())
    assert meta["layer_map"] == {"student": [1, 2], "teacher": [1, 3]}  # PKD-Last would take 2, 3
    assert meta["config"]["teacher_layers"] == "auto"
    assert "1<-1, 2<-3" in (output / "README.md").read_text()


def test_patient_settings_are_refused_where_they_do_not_fit(tiny_cache, tmp_path, distill_config):
    with pytest.raises(ConfigError, match="--pt-space must be one of raw, centered"):
        distill_config(tiny_cache, tmp_path / "a", pt_space="whitened")
    with pytest.raises(ConfigError, match="--teacher-layers takes layer numbers like 2,4 or auto"):
        distill_config(tiny_cache, tmp_path / "b", teacher_layers="best")
    with pytest.raises(ConfigError, match="only applies to the"):
        distill(distill_config(tiny_cache, tmp_path / "c", strategy="kd", teacher_layers="auto"))

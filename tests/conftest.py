"""Shared fixtures: a tiny task on disk, a real WordPiece tokenizer over its words, and tiny
random BERT models built from a config. Everything the pipeline tests need, in seconds, offline."""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# real datasets: $PKDPIPE_DATASETS, else a `shared/datasets` folder beside the clone (README, developers)
SHARED_DATASETS = Path(os.environ.get("PKDPIPE_DATASETS") or REPO.parent / "shared" / "datasets")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is never needed by the default suite
os.environ.setdefault("PKDPIPE_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LABELS = ["neg", "neu", "pos"]
_WORDS = {
    "neg": ["awful", "boring", "dull", "bad", "terrible", "weak"],
    "neu": ["plain", "average", "okay", "fine", "usual", "standard"],
    "pos": ["great", "superb", "lovely", "good", "brilliant", "strong"],
}
_FILLER = [
    "the",
    "film",
    "was",
    "a",
    "story",
    "with",
    "some",
    "acting",
    "and",
    "music",
    "very",
    "quite",
    "really",
]


@pytest.fixture(autouse=True)
def _seeded():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread; on a 2-core machine shared with subprocesses (torchrun
    ranks, kill-and-resume runs) more threads only wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sentence(rng: random.Random, label: str) -> str:
    words = [rng.choice(_FILLER) for _ in range(rng.randint(2, 14))]
    for _ in range(rng.randint(1, 2)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(_WORDS[label]))
    return " ".join(words)


def write_tiny_task(folder: Path, n_train: int = 96, n_dev: int = 30, n_test: int = 12) -> Path:
    """A 3-label sentiment task as CSV files and a task file; returns the task file."""
    rng = random.Random(1234)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        with open(folder / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for i in range(n):
                label = LABELS[i % 3]
                writer.writerow([_sentence(rng, label), label])
    task_file = folder / "tiny.toml"
    task_file.write_text(
        'name = "tiny"\ntext_fields = ["text"]\nlabel_field = "label"\n'
        f'labels = {json.dumps(LABELS)}\nmetric = "accuracy"\n'
        '[files]\ntrain = "train.csv"\ndev = "dev.csv"\ntest = "test.csv"\n'
    )
    return task_file


def write_tokenizer(folder: Path) -> None:
    """A real BERT WordPiece tokenizer over the tiny task's words (loaded with AutoTokenizer)."""
    from transformers import AutoTokenizer

    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *_FILLER,
        *(w for ws in _WORDS.values() for w in ws),
    ]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz.,!?'")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512})
    )
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))


def write_tiny_bert(folder: Path, layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """A random 'pre-trained' BERT encoder with the tiny tokenizer: what a student starts from."""
    from transformers import BertConfig, BertModel

    write_tokenizer(folder)
    vocab_size = len((folder / "vocab.txt").read_text().split())
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,  # --max-seq-len defaults to 128, which a model must take
    )
    BertModel(config).save_pretrained(str(folder))
    return folder


def write_tiny_mpnet(folder: Path, layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """A random 'pre-trained' MPNet (no token type ids, <s> = id 0 as [CLS], pad id 1, relative
    position buckets) with a real MPNet WordPiece tokenizer over the tiny task's words."""
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab = [
        "<s>",
        "<pad>",
        "</s>",
        "<unk>",
        "[UNK]",
        "<mask>",
        *_FILLER,
        *(w for ws in _WORDS.values() for w in ws),
    ]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz.,!?'")
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "MPNetTokenizer", "do_lower_case": True, "model_max_length": 512})
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = MPNetConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=130,  # MPNet numbers positions from pad_token_id + 1: 128 usable
        pad_token_id=tokenizer.pad_token_id,
    )
    MPNetModel(config).save_pretrained(str(folder))
    return folder


def write_tiny_teacher(folder: Path, pretrained: Path, num_labels: int = 3, seed: int = 1) -> Path:
    """A 'fine-tuned' classifier on top of `pretrained` (random head), with the finetune record."""
    from transformers import AutoModelForSequenceClassification

    from pkdpipe.models import label_config, quiet_transformers
    from pkdpipe.runfolder import FINETUNE_RECORD

    torch.manual_seed(seed)
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            str(pretrained), **label_config(tuple(LABELS[:num_labels]) if num_labels > 1 else None)
        )
    with torch.no_grad():  # move the weights away from the pre-trained ones, as fine-tuning would
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    for name in ("vocab.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        if (pretrained / name).is_file():
            (folder / name).write_bytes((pretrained / name).read_bytes())
    (folder / FINETUNE_RECORD).write_text(json.dumps({"base_model": str(pretrained)}))
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """Paths of the tiny world: task file, data folder, pre-trained encoder, teacher."""
    root = tmp_path_factory.mktemp("tiny")
    task_file = write_tiny_task(root / "data")
    pretrained = write_tiny_bert(root / "pretrained")
    teacher = write_tiny_teacher(root / "teacher", pretrained)
    return {
        "root": root,
        "task": str(task_file),
        "data": root / "data",
        "pretrained": pretrained,
        "teacher": teacher,
    }


@pytest.fixture(scope="session")
def tiny_cache(tiny, tmp_path_factory) -> Path:
    """A complete cache of the tiny teacher over train and dev (built once per session; read-only)."""
    from pkdpipe.teacher import cache_teacher

    return cache_teacher(_tiny_cache_config(tiny, tmp_path_factory.mktemp("cache-root"))).path


def _tiny_cache_config(tiny: dict, root: Path):
    """cache-teacher's settings for the tiny teacher: shards of 40 rows (train 96 -> 3 shards)."""
    from pkdpipe.config import CacheConfig

    return CacheConfig(
        task=tiny["task"],
        teacher=str(tiny["teacher"]),
        cache_dir=root,
        shard_size=40,
        batch_size=16,
        quiet=True,
    )


PLANTED_LAYER, PLANTED_DIM, PLANTED_VALUE = 2, 5, 1000.0


def _plant(model):
    """A forward hook on the teacher's layer 2: dimension 5 of every token's output += 1000, as
    one outlier dimension dominates the [CLS] vectors of real encoders' intermediate layers."""

    def add(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[..., PLANTED_DIM] += PLANTED_VALUE
        return output

    model.base_model.encoder.layer[PLANTED_LAYER - 1].register_forward_hook(add)


@pytest.fixture(scope="session")
def planted_cache(tiny, tmp_path_factory) -> Path:
    """A cache of the tiny teacher whose layer 2 [CLS] is dominated by one constant dimension."""
    from pkdpipe.teacher import cache_teacher

    config = _tiny_cache_config(tiny, tmp_path_factory.mktemp("planted"))
    return cache_teacher(config, teacher_hook=_plant).path


def shared_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"{path} is not here (real-data tests read $PKDPIPE_DATASETS)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """torch on one CPU thread for a module: tiny models train many times faster that way on a
    machine whose cores other processes share (intra-op threads otherwise wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def distill_config():
    """A factory of DistillConfig for tests: by default a 2-layer PKD-Skip student of the tiny teacher
    over one epoch, on CPU, quiet; keyword arguments override any field."""
    from pkdpipe.config import DistillConfig

    def make(cache: Path | None, output: Path, **overrides):
        settings = {
            "cache": str(cache) if cache is not None else None,
            "strategy": "skip",
            "layers": 2,
            "output": output,
            "epochs": 1,
            "batch_size": 8,
            "lr": 1e-3,
            "device": "cpu",
            "quiet": True,
        }
        return DistillConfig(**{**settings, **overrides})

    return make


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory) -> Iterator[str]:
    """An s3:// store URL on a moto S3 server started for this session (tests marked s3); skips
    with the reason when s3fs or moto's server is not installed."""
    from servers import moto_s3

    with moto_s3("pkd-team", tmp_path_factory.mktemp("moto") / "server.log") as bucket:
        yield f"{bucket}/caches"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL for Optuna (tests marked postgres): PKDPIPE_TEST_POSTGRES, or a server
    started for this session; skips with the reason when no server or driver is installed."""
    from servers import postgresql

    with postgresql() as url:
        yield url

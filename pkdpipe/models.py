"""Loading teachers and students, and reading their [CLS] vectors, for any HF encoder.

Nothing here names a BERT module: layers are read through `output_hidden_states=True` (the
embeddings output, then one entry per encoder layer) and depth is changed through the config's
`num_hidden_layers`, which DistilBERT, RoBERTa, MPNet and friends all map onto their own fields.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from pkdpipe import runfolder
from pkdpipe.errors import ModelError
from pkdpipe.paths import hub_unreachable, looks_local


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report (e.g. the long list of unused keys when cutting layers)."""
    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def _refuse_missing_folder(name: str) -> None:
    """A name that can only be a local folder is not sent to the hub (which retries for a minute)."""
    if looks_local(name) and not Path(name).expanduser().exists():
        raise ModelError(f"model folder not found: {name}")


def _load_failed(what: str, name: str, err: Exception) -> ModelError:
    folder = Path(name)
    if folder.is_dir():  # transformers says "No such file" of a file it may not read
        unreadable = sorted(p.name for p in folder.iterdir() if p.is_file() and not os.access(p, os.R_OK))
        if unreadable:
            return ModelError(f"cannot load {what} from {name}: permission denied: {', '.join(unreadable)}")
    if folder.exists():
        return ModelError(f"cannot load {what} from {name}: {str(err).splitlines()[0]}")
    return ModelError(f"{what} {name!r} is not a local folder, and {hub_failure(err)}")


def hub_failure(err: Exception) -> str:
    """Why the hub gave nothing, in words, with what to do offline: the exception says whether the
    hub could not be reached (no network, HF_HUB_OFFLINE) or had no such name."""
    if hub_unreachable(err):
        return (
            "the Hugging Face hub is unreachable from here: set HF_HUB_OFFLINE=1 (no minute of retries) "
            "and pass a local folder instead (one with config.json and the weights, e.g. a finetune output)"
        )
    return (
        f"the Hugging Face hub has no such model ({type(err).__name__}); pass a local folder with "
        "config.json and the weights (offline: set HF_HUB_OFFLINE=1)"
    )


def load_tokenizer(name: str, trust_remote_code: bool = False):
    _refuse_missing_folder(str(name))
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(name), trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises OSError, ValueError, HTTP errors...
        raise _load_failed("tokenizer", str(name), err) from None


# Models that number positions from padding_idx + 1 (RoBERTa's scheme): their last usable position
# is max_position_embeddings - (pad_token_id + 1).
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet", "longformer", "data2vec-text")


def max_input_length(config) -> int | None:
    """The most tokens (special tokens included) a model's position embeddings can take."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return None
    if config.model_type in _OFFSET_POSITIONS:
        positions -= (config.pad_token_id or 0) + 1
    return positions


def check_max_seq_len(config, max_seq_len: int, name: str) -> None:
    """Refuse --max-seq-len past the model's positions, before a long text fails mid-run."""
    limit = max_input_length(config)
    if limit is not None and max_seq_len > limit:
        raise ModelError(
            f"--max-seq-len {max_seq_len} is more than {name} can take ({limit} positions): "
            f"use {limit} or less"
        )


def load_config(name: str, trust_remote_code: bool = False):
    _refuse_missing_folder(str(name))
    try:
        return AutoConfig.from_pretrained(str(name), trust_remote_code=trust_remote_code)
    except Exception as err:
        raise _load_failed("model", str(name), err) from None


def load_classifier(name: str, trust_remote_code: bool = False, fresh_head: bool = False, **config_overrides):
    """An `AutoModelForSequenceClassification`, optionally with config fields overridden
    (num_labels, id2label, num_hidden_layers to keep only the first K layers).

    Every weight must come from the checkpoint, or the model is refused with one line: a teacher
    whose config says 6 layers but whose weights hold 4 would otherwise run with 2 random layers.
    `fresh_head=True` (a student, or a model about to be fine-tuned) lets the classification head,
    and only the head, start new."""
    config = load_config(name, trust_remote_code)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    try:
        with quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(name), config=config, trust_remote_code=trust_remote_code, output_loading_info=True
            )
    except Exception as err:
        raise _load_failed("model", str(name), err) from None
    _check_loaded(model, sorted(info.get("missing_keys", ())), str(name), fresh_head)
    return model


def _is_head(model, key: str) -> bool:
    """A parameter of the classification head (and the pooler that feeds it), which a pre-trained
    encoder does not have: everything outside the base model."""
    return not key.startswith(f"{model.base_model_prefix}.") or ".pooler." in key


def _check_loaded(model, missing: list[str], name: str, fresh_head: bool) -> None:
    body = [key for key in missing if not _is_head(model, key)]
    if body:
        raise ModelError(
            f"{name} has no weights for {len(body)} parameter(s) of its encoder (e.g. {body[0]}): its "
            "weights do not fit its config.json (fewer layers than num_hidden_layers?)"
        )
    if missing and not fresh_head:
        raise ModelError(
            f"{name} has no trained classification head ({', '.join(missing[:2])} missing): it is a "
            "pre-trained encoder, not a fine-tuned classifier; fine-tune it first (pkdpipe finetune)"
        )


def label_config(labels: tuple[str, ...] | None) -> dict:
    """Config fields that give a classifier named labels (or a single regression output)."""
    if labels is None:
        return {
            "num_labels": 1,
            "problem_type": "regression",
            "id2label": {0: "score"},
            "label2id": {"score": 0},
        }
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
        "problem_type": "single_label_classification",
    }


def num_layers(config) -> int:
    return int(config.num_hidden_layers)


def hidden_size(config) -> int:
    return int(config.hidden_size)


def cls_vectors(hidden_states: tuple[torch.Tensor, ...], layers) -> torch.Tensor:
    """(batch, len(layers), hidden): the first token's vector of each requested layer
    (0 = embeddings output, i = output of encoder layer i)."""
    return torch.stack([hidden_states[i][:, 0] for i in layers], dim=1)


def pretrained_origin(model_dir: str | Path) -> str | None:
    """The pre-trained model a `finetune` output started from, if it recorded one."""
    return runfolder.read(model_dir, "finetune").record.get("base_model")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def use_threads(threads: int) -> None:
    """`--threads N`: torch's CPU threads for this process (0 leaves torch's choice, one per core).
    On a machine whose cores other jobs share, fewer threads wait less on each other."""
    if threads:
        torch.set_num_threads(threads)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def autocast(device: torch.device, precision: str):
    """An autocast context for `precision` (fp32 = no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise ModelError("--precision fp16 needs a GPU; use bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)

"""Fingerprints of everything that changes a cache's contents, and the key made from them.

Each input is reduced to a sha256 over a canonical form (sorted-key JSON, or raw tensor bytes in a
fixed order), so two people with the same teacher, tokenizer, data and settings get the same key,
whatever their paths or machines.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT_VERSION = 1  # bump when a dataset's or a manifest field's meaning changes: old readers then refuse
KEY_LENGTH = 16  # hex digits of the sha256 used as a folder name (64 bits: no accidental clashes)


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256_json(obj) -> str:
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def sha256_file(path: str | Path, chunk: int = 4 << 20) -> str:
    """The file's sha256, read `chunk` bytes at a time into one reused buffer (no copy per block)."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def hash_weights(model) -> str:
    """sha256 over every parameter and buffer as loaded (names, dtypes, shapes, bytes), so the
    same weights give the same hash whether they came from safetensors, a .bin or the hub."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def hash_tokenizer(tokenizer) -> str:
    """sha256 of what decides the token ids: the fast tokenizer's full definition (vocab, merges,
    normaliser, pre-tokeniser, post-processor) and its special tokens. Padding and truncation
    state is dropped: it is set per call and does not change the ids we store."""
    parts: dict = {
        "class": type(tokenizer).__name__.removesuffix("Fast"),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "model_input_names": list(tokenizer.model_input_names),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
        parts["backend"] = definition
    else:
        parts["vocab"] = sorted(tokenizer.get_vocab().items())
    return sha256_json(parts)


def cache_key(inputs: dict) -> str:
    """The cache key: a short sha256 of the canonical JSON of every input that changes the contents."""
    return sha256_json({"format_version": FORMAT_VERSION, **inputs})[:KEY_LENGTH]

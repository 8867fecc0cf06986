"""manifest.json, typed: the table of contents of a cache, written last (its presence means complete).

`Manifest` and the dataclasses below are the one schema of the manifest: `parse` checks a JSON
object against them field by field (types, required fields, safe file names, no shard listed
twice) before any shard is opened, and `check_key` checks the key against its inputs, at every
entry point: reading a local cache, verifying one, pulling one. (Row counts against the shards are
verify's and the reader's `check_rows`.) The JSON itself stays available as written (a `Manifest`
reads like the dict, `manifest["teacher"]["name_or_path"]`), for tools and for display.

`KeyInputs` is everything that changes a cache's contents: `cache-teacher` builds it once, the key
is its hash, and the manifest stores each input in its documented field, so anyone can recompute
the key from a manifest (docs/cache-format.md, "The key").
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pkdpipe import files
from pkdpipe.cache import codec as codecs
from pkdpipe.cache.fingerprint import FORMAT_VERSION, cache_key
from pkdpipe.errors import CacheError

MANIFEST = "manifest.json"
FORMAT_NAME = "pkdpipe-teacher-cache"
_SAFE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.h5$")


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.h5"


def safe_file(folder: Path, name: str) -> Path:
    """`folder/name`, refusing anything but a plain shard file name."""
    if not isinstance(name, str) or not _SAFE_FILE.match(name) or ".." in name:
        raise CacheError(f"manifest in {folder} names an unsafe file {name!r}: refusing to read it")
    return folder / name


# -- the schema --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Extent:
    """Where one dataset's bytes lie in its shard file, and their sha256: what lets a pull fetch and
    check only the datasets a student needs (`pkdpipe.cache.extents`)."""

    offset: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Shard:
    file: str  # a plain file name in the cache folder
    rows: int
    sha256: str
    bytes: int | None = None
    datasets: dict[str, Extent] | None = None  # each dataset's byte range and sha256 (absent: an older cache)


@dataclass(frozen=True)
class Split:
    examples: int
    shards: tuple[Shard, ...]


@dataclass(frozen=True, kw_only=True)
class Teacher:
    name_or_path: str
    model_type: str
    architecture: str
    num_layers: int
    hidden_size: int
    pretrained_from: str | None = None
    weights_sha256: str


@dataclass(frozen=True)
class Dataset:
    source: str
    sha256: dict[str, str]  # per split
    train_rows: int | None = None  # a seeded sample of the train split (--train-rows); None: all of it


@dataclass(frozen=True)
class KeyInputs:
    """Everything that changes a cache's contents; the key is the hash of these and the format version."""

    task: dict  # the task's fingerprint: fields, labels, metrics, dev carve-out
    teacher_weights: str
    tokenizer: str
    datasets: dict[str, str]  # split -> sha256 of its content
    max_seq_len: int
    truncation: str
    layers: list[int]
    hidden_dtype: str
    logits_dtype: str
    precision: str
    codec: str = codecs.FLOAT16  # how the [CLS] vectors are stored (pkdpipe.cache.codec)

    def key(self) -> str:
        """The hash of the inputs. The codec enters it only when it is not float16, so caches made
        before there were codecs keep their key; and a pkdpipe from before then, which cannot
        decode int8, computes another key for an int8 cache and refuses it instead of misreading it."""
        inputs = dataclasses.asdict(self)
        if self.codec == codecs.FLOAT16:
            del inputs["codec"]
        return cache_key(inputs)

    @classmethod
    def of(cls, manifest: Manifest) -> KeyInputs:
        """The inputs as the manifest stores them, each in its documented field."""
        m = manifest
        return cls(
            task=m.task_spec,
            teacher_weights=m.teacher.weights_sha256,
            tokenizer=m.tokenizer_sha256,
            datasets=m.dataset.sha256,
            max_seq_len=m.max_seq_len,
            truncation=m.truncation,
            layers=list(m.layers),
            hidden_dtype=m.hidden_dtype,
            logits_dtype=m.logits_dtype,
            precision=m.precision,
            codec=m.codec,
        )


@dataclass(frozen=True, kw_only=True)
class Manifest(Mapping):
    """The fields in the order manifest.json lists them (`to_json`), as docs/cache-format.md does."""

    format: str
    format_version: int
    key: str
    task: str
    task_spec: dict
    label_names: list[str] | None
    num_labels: int
    teacher: Teacher
    tokenizer_sha256: str
    dataset: Dataset
    max_seq_len: int
    truncation: str
    uses_token_type_ids: bool
    layers: list[int]
    hidden_dtype: str
    codec: str = codecs.FLOAT16  # how hidden/<layer> stores the [CLS] vectors (absent: float16)
    logits_dtype: str
    precision: str
    splits: dict[str, Split]
    cls_stats: bool = False  # shards store each layer's per-dimension statistics (pkdpipe.cache.stats)
    teacher_metrics: dict
    created: str
    tool_version: str
    command: str
    config: dict
    vocab_size: int | None = None  # token ids lie in 0..vocab_size-1 (caches made since pkdpipe 0.3)
    timings: dict = field(default_factory=dict)
    # a local copy pulled with --layers holds only these of `layers` (None: all of them, and absent
    # from manifest.json); the key, which covers `layers`, is the full cache's: a partial copy is
    # that cache, with less of it here
    layers_present: list[int] | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the JSON as written

    def to_json(self) -> dict:
        """The JSON object manifest.json holds: every field but `raw`, nested records as objects."""
        data = dataclasses.asdict(dataclasses.replace(self, raw={}))
        del data["raw"]
        if data["layers_present"] is None:  # a whole cache: written as before partial copies existed
            del data["layers_present"]
        for info in data["splits"].values():
            for shard in info["shards"]:
                if shard["datasets"] is None:  # a shard not laid out in plain ranges: pulled whole
                    del shard["datasets"]
        return json.loads(json.dumps(data))  # plain JSON values: tuples of shards become lists

    # the JSON, read like a dict
    def __getitem__(self, name: str):
        return self.raw[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def present(self) -> tuple[int, ...]:
        """The layers whose vectors this copy holds: `layers`, or fewer in a partial copy."""
        return tuple(self.layers if self.layers_present is None else self.layers_present)

    @property
    def partial(self) -> bool:
        """A copy pulled with --layers: its shards hold the datasets of `present` only, and are
        checked dataset by dataset (`Shard.datasets`), not against the full files' sha256."""
        return self.layers_present is not None

    def shards(self, split: str | None = None) -> list[Shard]:
        """The shards of one split, or of all splits in manifest order."""
        chosen = [self.splits[split]] if split is not None else self.splits.values()
        return [shard for info in chosen for shard in info.shards]


def parse(data: object, where: Path | str) -> Manifest:
    """A `Manifest` from JSON data, or one CacheError line saying what is wrong with it. The key is
    checked against its inputs separately (`check_key`), after a store has said where it is."""
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise CacheError(f"{where} is not a pkdpipe cache manifest")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(
            f"{where} has cache format version {version!r}; this pkdpipe reads version {FORMAT_VERSION}"
        )
    if not isinstance(data.get("splits"), dict) or not data["splits"]:
        raise CacheError(f"{where} lists no splits")
    manifest = dataclasses.replace(_build(Manifest, data, where, "manifest"), raw=data)
    folder = Path(where).parent
    for shard in manifest.shards():
        safe_file(folder, shard.file)
    names = [s.file for s in manifest.shards()]
    if len(set(names)) != len(names):
        raise CacheError(f"{where} lists a shard twice: refusing to read it")
    _check_values(manifest, where)
    return manifest


_HEX = re.compile(r"^[0-9a-f]+$")
_MAX_BYTES = 2**50  # a petabyte: no shard is larger
_MAX_ROWS = 2**40
_CODEC_DTYPES = {(codecs.FLOAT16, "float16"), (codecs.FLOAT16, "float32"), (codecs.INT8, "int8")}


def _check_values(m: Manifest, where) -> None:
    """What the key does not cover must agree with what it does, or lie in range: a store's manifest
    could otherwise swap the label names (a student's id2label), claim a teacher of 10^9 layers (its
    layer maps), or sizes that no file has."""

    def refuse(what: str) -> None:
        raise CacheError(f"{where} is malformed: {what}")

    spec_labels = m.task_spec.get("labels")
    if m.label_names != spec_labels:
        refuse("label_names are not the task's labels, which the key covers")
    if m.num_labels != (len(m.label_names) if m.label_names is not None else 1):
        refuse(f"num_labels {m.num_labels} does not fit {len(m.label_names or [])} label names")
    t = m.teacher
    if not 1 <= t.num_layers <= 1024 or not 1 <= t.hidden_size <= 65536:
        refuse(f"teacher.num_layers {t.num_layers} or hidden_size {t.hidden_size} is out of range")
    if (
        not m.layers
        or m.layers != sorted(set(m.layers))
        or not 0 <= m.layers[0] <= m.layers[-1] <= t.num_layers
    ):
        refuse(f"layers {m.layers} are not distinct ascending layers of a {t.num_layers}-layer teacher")
    if t.pretrained_from is not None and (
        len(t.pretrained_from) > 4096 or not t.pretrained_from.isprintable()
    ):
        refuse("teacher.pretrained_from is not a model name or folder")
    present = m.layers_present
    if present is not None and (present != sorted(set(present)) or not set(present) <= set(m.layers)):
        refuse(f"layers_present {present} are not distinct ascending layers among {m.layers}")
    if present is not None and any(s.datasets is None for s in m.shards()):
        refuse("a partial copy (layers_present) whose shards record no per-dataset checksums")
    if (m.codec, m.hidden_dtype) not in _CODEC_DTYPES:
        refuse(f"codec {m.codec!r} with hidden_dtype {m.hidden_dtype!r} is not a way pkdpipe stores vectors")
    if m.codec == codecs.INT8 and not m.cls_stats:  # readers take int8 caches' statistics as stored
        refuse("an int8 cache without cls_stats")
    if not 1 <= m.max_seq_len <= 1_000_000:
        refuse(f"max_seq_len {m.max_seq_len} is out of range")
    if m.vocab_size is not None and not 1 <= m.vocab_size <= 100_000_000:
        refuse(f"vocab_size {m.vocab_size} is out of range")
    for split, info in m.splits.items():
        if not 0 <= info.examples <= _MAX_ROWS or info.examples != sum(s.rows for s in info.shards):
            refuse(f"split {split!r} holds {info.examples} examples, not the sum of its shards' rows")
        for shard in info.shards:
            if shard.rows < 0 or len(shard.sha256) != 64 or not _HEX.match(shard.sha256):
                refuse(f"shard {shard.file} has a negative row count or a sha256 that is not 64 hex digits")
            if shard.bytes is not None and not 0 < shard.bytes <= _MAX_BYTES:
                refuse(f"shard {shard.file} claims {shard.bytes} bytes")
            for name, extent in (shard.datasets or {}).items():
                end = shard.bytes if shard.bytes is not None else _MAX_BYTES
                if min(extent.offset, extent.bytes) < 0 or extent.offset + extent.bytes > end:
                    refuse(f"shard {shard.file}: dataset {name} lies outside the file")
                if len(extent.sha256) != 64 or not _HEX.match(extent.sha256):
                    refuse(f"shard {shard.file}: dataset {name} has a sha256 that is not 64 hex digits")


def check_key(manifest: Manifest, where: Path | str) -> Manifest:
    """Refuse a manifest whose key is not the hash of the inputs it records (a cache relabelled by
    hand, or by a hostile store, to pass for another)."""
    if KeyInputs.of(manifest).key() != manifest.key:
        raise CacheError(f"{where}: its key {manifest.key} is not the hash of the inputs it records")
    if manifest.task_spec.get("name") != manifest.task:
        raise CacheError(f"{where}: task {manifest.task!r} is not the task its key covers")
    return manifest


def _build(cls, data: object, where, path: str):
    """An instance of dataclass `cls` from JSON `data`, every field checked against its type."""
    if not isinstance(data, dict):
        raise CacheError(f"{where} is malformed: {path} is not an object")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name == "raw":
            continue
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CacheError(f"{where} is malformed: {path} has no {f.name!r}")
            continue
        values[f.name] = _value(hints[f.name], data[f.name], where, f"{path}.{f.name}")
    return cls(**values)


def _value(hint, value, where, path: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _value(hint, value, where, path)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, path)
    if origin in (tuple, list):  # tuple[X, ...] or list[X], from a JSON list
        items = [_value(args[0], v, where, f"{path}[{i}]") for i, v in enumerate(_list(value, where, path))]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise CacheError(f"{where} is malformed: {path} is not an object")
        if not args:
            return value
        return {k: _value(args[1], v, where, f"{path}.{k}") for k, v in value.items()}
    expected = {int: (int,), bool: (bool,), str: (str,)}[hint]
    if not isinstance(value, expected) or (hint is int and isinstance(value, bool)):
        raise CacheError(f"{where} is malformed: {path} is not a{'n' if hint is int else ''} {hint.__name__}")
    return value


def _list(value, where, path: str) -> list:
    if not isinstance(value, list):
        raise CacheError(f"{where} is malformed: {path} is not a list")
    return value


def read(folder: str | Path) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise CacheError(f"{path} is not a regular file: refusing to read it")
    if not path.is_file():
        if folder.is_dir():
            raise CacheError(f"{folder} has no {MANIFEST}: the cache is incomplete (run cache-teacher again)")
        raise CacheError(f"no cache at {folder}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"cannot read {path}: {err}") from None
    return check_place(check_key(parse(data, path), path), folder)


_KEY_NAME = re.compile(r"^[0-9a-f]{16}$")


def check_place(manifest: Manifest, folder: Path) -> Manifest:
    """A cache in a key-named folder (`<root>/<task>/<key>/`, where pkdpipe looks caches up) must be
    the cache of that key: one copied under another key's name would be taken for it (a "cache hit"
    for other settings). A folder named otherwise is a path the user gave."""
    if _KEY_NAME.match(folder.name) and folder.name != manifest.key:
        raise CacheError(
            f"{folder} holds cache {manifest.task}/{manifest.key}, not the one its folder names: a cache "
            f"is found only under its own key (move it to <root>/{manifest.task}/{manifest.key})"
        )
    return manifest


def write(folder: Path, manifest: Manifest) -> None:
    """Write the manifest whole or not at all (a full disk or a read-only folder: one line)."""
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=False)
    files.write_text(folder / MANIFEST, text + "\n", CacheError)

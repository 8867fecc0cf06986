"""Bytes a layer-selective pull moves against a full pull (issue 29 item 2), for float16 and int8.

A random 12-layer BERT of hidden 768 (built from a config, a fresh classification head; MiniLM's
tokenizer) caches the first `--rows` rows of SST-2 train at max length 64 (every layer, 0-12), once
per codec; the cache is pushed to a folder store, then pulled into fresh cache roots:

1. whole (`pkdpipe cache pull KEY`);
2. the layers PKD-Skip 12->6 maps, 2,4,6,8,10 (`pkdpipe cache pull KEY --layers 2,4,6,8,10`);
3. then PKD-Last 12->6's (7-11) into that copy: only 7, 9 and 11 are missing, and only they come.

Bytes moved = every byte read from the store's files (manifest included), counted where fsspec's
local file object returns them (`LocalFileOpener.read`), under both pulls alike. Goal for 2: at most
45% of 1's bytes. Also shown, for the design choice: what h5py reads when it opens the store's shard
through fsspec and reads the same datasets itself (each read call is a request to a remote store),
against the one ranged read per dataset that the pull makes.

With --s3 the float16 cache also goes through a moto S3 server started here (s3fs as the client),
where each read is a request: a full pull, the PKD-Skip pull, and h5py through s3fs with three of
fsspec's caches.

Run from the repository root:  python benchmarks/bench_pull.py [--rows 2048] [--s3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_DATASETS,
    command_line,
    log,
    machine_lines,
    minilm_path,
    set_threads,
    table,
    write_sst2_slice,
)

SKIP_12_6 = [2, 4, 6, 8, 10]
LAST_12_6 = [7, 8, 9, 10, 11]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2048, help="first N rows of SST-2 train")
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATASETS / "sst2", help="SST-2 folder (classic GLUE TSV)"
    )
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=1024, help="rows per shard")
    p.add_argument(
        "--intermediate", type=int, default=768, help="the random teacher's FFN width (only its speed)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--s3",
        action="store_true",
        help='also over a moto S3 server (pip install s3fs "moto[server]"), float16',
    )
    p.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp dir)")
    return p.parse_args(argv)


def make_teacher(folder: Path, intermediate: int) -> Path:
    """A random BERT-base-shaped classifier (12 layers, hidden 768) with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pkdpipe.models import FINETUNE_RECORD

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=intermediate,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / FINETUNE_RECORD).write_text(json.dumps({"base_model": str(folder)}))
    return folder


class ReadCounter:
    """Counts the bytes and the read calls of fsspec's local files (the folder store's side)."""

    def __init__(self):
        from fsspec.implementations.local import LocalFileOpener

        self.bytes = self.calls = 0
        self._cls, self._read = LocalFileOpener, LocalFileOpener.read
        counter = self

        def read(opener, *args, **kwargs):
            data = counter._read(opener, *args, **kwargs)
            counter.bytes += len(data)
            counter.calls += 1
            return data

        LocalFileOpener.read = read

    def take(self) -> tuple[int, int]:
        out = (self.bytes, self.calls)
        self.bytes = self.calls = 0
        return out

    def close(self) -> None:
        self._cls.read = self._read


def h5py_through_fsspec(url: str, manifest: dict, layers: list[int], **open_kwargs) -> tuple[int, int]:
    """(bytes, reads) h5py makes when it opens each store shard through fsspec (`open_kwargs`: its
    cache) and reads the datasets a copy of `layers` needs: the alternative to ranged reads of
    recorded extents."""
    import fsspec
    import h5py

    from pkdpipe.cache import extents
    from pkdpipe.cache import manifest as mf

    m = mf.parse(manifest, Path(url) / mf.MANIFEST)
    total = calls = 0
    fs, base = fsspec.core.url_to_fs(url)
    for shard in m.shards():
        with fs.open(f"{base}/{shard.file}", "rb", **open_kwargs) as raw:
            counted = _Counting(raw)
            with h5py.File(counted, "r") as f:
                for name in extents.needed(m, shard, layers):
                    f[name][:]
            total, calls = total + counted.bytes, calls + counted.calls
    return total, calls


class _Counting:
    """A file object that counts what is read through it (what a remote store would send)."""

    def __init__(self, f):
        self.f, self.bytes, self.calls = f, 0, 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.bytes += len(data)
        self.calls += 1
        return data

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, *args):
        return self.f.seek(*args)

    def tell(self):
        return self.f.tell()

    def seekable(self):
        return True

    def readable(self):
        return True


class S3Counter:
    """Counts the object bytes s3fs receives and its GET requests: ranged reads of files
    (`S3File._fetch_range`, under fsspec's cache) and whole or ranged `cat_file`s."""

    def __init__(self):
        import s3fs

        self.bytes = self.calls = 0
        self._saved = (s3fs.core.S3File._fetch_range, s3fs.S3FileSystem._cat_file)
        fetch, cat = self._saved
        counter = self

        def fetch_range(f, start, end):
            data = fetch(f, start, end)
            counter.bytes, counter.calls = counter.bytes + len(data), counter.calls + 1
            return data

        async def cat_file(fs, path, version_id=None, start=None, end=None):
            data = await cat(fs, path, version_id=version_id, start=start, end=end)
            counter.bytes, counter.calls = counter.bytes + len(data), counter.calls + 1
            return data

        s3fs.core.S3File._fetch_range, s3fs.S3FileSystem._cat_file = fetch_range, cat_file
        s3fs.S3FileSystem.clear_instance_cache()  # a cached instance keeps the unpatched cat_file

    def take(self) -> tuple[int, int]:
        out = (self.bytes, self.calls)
        self.bytes = self.calls = 0
        return out

    def close(self) -> None:
        import s3fs

        s3fs.core.S3File._fetch_range, s3fs.S3FileSystem._cat_file = self._saved


def over_s3(folder: Path, key: str, work: Path) -> list[tuple[str, int, int]]:
    """(way, bytes, GET requests) over a moto S3 server started here (`pip install s3fs
    "moto[server]"`): a full pull, the PKD-Skip 12->6 pull, and h5py reading the same datasets
    through s3fs with its default cache, a 64 KiB readahead cache and none."""
    import os
    import socket
    import subprocess
    import time

    import s3fs

    from pkdpipe.cache import store

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    saved = dict(os.environ)
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    with open(work / "moto.log", "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-p", str(port)], stdout=out, stderr=out
        )
    counter = None
    try:
        for _ in range(200):  # the server takes a few seconds to start
            try:
                s3fs.S3FileSystem(skip_instance_cache=True).mkdir("pkd-bench")
                break
            except Exception:
                time.sleep(0.3)
        url = "s3://pkd-bench/caches"
        store.push(folder, url, quiet=True)
        counter = S3Counter()
        store.pull(key, work / "s3-full", store=url, quiet=True)
        rows = [("full pull", *counter.take())]
        store.pull(key, work / "s3-part", store=url, quiet=True, layers=SKIP_12_6)
        rows.append(("--layers 2,4,6,8,10", *counter.take()))
        manifest = json.loads((folder / "manifest.json").read_text())
        for way, kwargs in (
            ("h5py via s3fs, its defaults", {}),
            ("h5py via s3fs, readahead 64 KiB", {"block_size": 1 << 16, "cache_type": "readahead"}),
            ("h5py via s3fs, no cache", {"cache_type": "none"}),
        ):
            h5py_through_fsspec(f"{url}/{folder.parent.name}/{key}", manifest, SKIP_12_6, **kwargs)
            rows.append((way, *counter.take()))
        return rows
    finally:
        if counter is not None:
            counter.close()
        server.terminate()
        server.wait(timeout=10)
        os.environ.clear()
        os.environ.update(saved)


def main(argv=None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    from pkdpipe.cache import store
    from pkdpipe.cache.verify import verify_cache
    from pkdpipe.config import CacheConfig
    from pkdpipe.teacher import cache_teacher

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-pull-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = write_sst2_slice(args.data, work / "sst2", args.rows)
    teacher = make_teacher(work / "teacher", args.intermediate)
    url = str(work / "store")
    results, s3_rows = [], []
    try:
        for codec in ("float16", "int8"):
            log(f"{codec}: caching {rows} rows with the random 12-layer teacher ...")
            built = cache_teacher(
                CacheConfig(
                    task="sst2",
                    data_dir=work / "sst2",
                    teacher=str(teacher),
                    splits=("train",),
                    cache_dir=work / f"built-{codec}",
                    max_seq_len=args.max_seq_len,
                    shard_size=args.shard_size,
                    codec=codec,
                    device="cpu",
                    quiet=True,
                    command="bench_pull",
                )
            )
            store.push(built.path, url, quiet=True)
            counter = ReadCounter()
            try:
                full = store.pull(built.key, work / f"full-{codec}", store=url, quiet=True)
                full_bytes, full_calls = counter.take()
                part = store.pull(built.key, work / f"part-{codec}", store=url, quiet=True, layers=SKIP_12_6)
                part_bytes, part_calls = counter.take()
                store.pull(built.key, work / f"part-{codec}", store=url, quiet=True, layers=LAST_12_6)
                more_bytes, more_calls = counter.take()
            finally:
                counter.close()
            assert verify_cache(part).ok and verify_cache(full).ok
            manifest = json.loads((full / "manifest.json").read_text())
            alt_bytes, alt_calls = h5py_through_fsspec(f"{url}/sst2/{built.key}", manifest, SKIP_12_6)
            shards = len([s for info in manifest["splits"].values() for s in info["shards"]])
            results.append(
                (codec, full_bytes, full_calls, part_bytes, part_calls, more_bytes, more_calls, alt_bytes,
                 alt_calls, shards)
            )  # fmt: skip
            if args.s3 and codec == "float16":
                log("float16: the same pulls over a moto S3 server ...")
                s3_rows = over_s3(built.path, built.key, work)
            shutil.rmtree(work / f"built-{codec}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"# bench_pull: {command_line()}")
    for line in machine_lines():
        print(f"# {line}")
    print(
        f"# cache: SST-2 train, first {rows} rows, max length {args.max_seq_len}, a random 12-layer "
        f"BERT of hidden 768, layers 0-12 stored, {args.shard_size} rows a shard; folder store"
    )
    mib = float(1 << 20)
    out = []
    for codec, fb, fc, pb, pc, mb, mc, ab, ac, shards in results:
        for pull, moved, reads, note in (
            ("full pull", fb, fc, f"{shards} shard(s)"),
            ("--layers 2,4,6,8,10", pb, pc, "goal <= 45%"),
            ("then --layers 7-11", mb, mc, "adds 7,9,11"),
            ("h5py via fsspec, 2-10", ab, ac, "alternative"),
        ):
            out.append((codec, pull, f"{moved / mib:.2f}", f"{100 * moved / fb:.1f}%", str(reads), note))
    print(table(out, ("codec", "pull", "MiB moved", "of full", "reads", "")))
    if s3_rows:
        print(
            "\n# float16 over S3 (a moto server on this machine; s3fs): object bytes received, GET requests"
        )
        full = s3_rows[0][1]
        print(
            table(
                [(way, f"{b / mib:.2f}", f"{100 * b / full:.1f}%", str(c)) for way, b, c in s3_rows],
                ("pull", "MiB received", "of full", "GETs"),
            )
        )


if __name__ == "__main__":
    main()

"""The [CLS] codecs of the cache (issue 29, item 1): per layer, what each codec moves a normalised
[CLS] vector by, against how much those vectors differ between examples; and the bytes per example.

The patient loss compares L2-normalised [CLS] vectors n = x / |x|. At most intermediate layers one
outlier dimension holds nearly all of n, so n differs little between examples: a codec is judged
against that per-example variation, not against |n| = 1. Per layer it reports

  variation      mean over rows of |n - mean(n)|  (L2: how far a row is from the layer's mean)
  <codec> error  mean over rows of |n_decoded - n|  (L2), n from the teacher's float32 output

for float16 (the default), int8 as pkdpipe writes it (per dimension, per 1,024-row block, centred on
the middle of the block's range), and two int8 variants it did not choose, for comparison: centred
on the block's per-dimension mean (the same scale per dimension, codes to max |x - mean|), and one
scale per row (symmetric, max |x| / 127: what an outlier dimension defeats).

Fresh (default): the real 6-layer MiniLM (`pkdpipe.demo.default_model()`) with a seeded 77-label
head runs over BANKING77 (the bundled data/banking77) by `cache_teacher` three times: --dtype float32
(the reference), float16 and --codec int8; the int8 figures are read back through the reader, so the
writer's blocks and the reader's decoding are what is measured. Bytes per example are the shards'
bytes in each manifest over its examples, and the payload of the [CLS] vectors alone.
With --cache PATH: an existing cache's stored vectors are the reference (a float16 cache's rounding
then is not seen) and int8 is applied to them block by block as the writer would.

Run from the repository root:
  python benchmarks/bench_codec.py                       # BANKING77 test split (3,080 rows), max length 64
  python benchmarks/bench_codec.py --split train         # 10,003 rows
  python benchmarks/bench_codec.py --cache ~/.cache/pkdpipe/sst2/<key>
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, command_line, log, machine_lines, make_teacher, set_threads, table  # noqa: E402

from pkdpipe.cache import codec, schema  # noqa: E402
from pkdpipe.cache.reader import open_cache  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, help="measure an existing cache instead of building three")
    p.add_argument("--data", type=Path, default=REPO / "data" / "banking77", help="BANKING77 data folder")
    p.add_argument("--split", default="test", help="the BANKING77 split to cache (test: 3,080 rows)")
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", type=Path, help="keep the caches here (default: a temporary folder)")
    return p.parse_args()


def normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def moved(decoded: np.ndarray, n: np.ndarray) -> float:
    """Mean L2 distance between the normalised decoded rows and the reference's normalised rows `n`."""
    return float(np.linalg.norm(normalised(decoded) - n, axis=1).mean())


def blockwise(x: np.ndarray, shard_rows: list[int], encode) -> np.ndarray:
    """`x` (a split's rows, shard after shard) through `encode` (block -> decoded block), in the
    writer's blocks: 1,024 rows counted from each shard's first row."""
    out, start = [], 0
    for rows in shard_rows:
        for b in range(start, start + rows, codec.BLOCK_ROWS):
            out.append(encode(x[b : min(b + codec.BLOCK_ROWS, start + rows)]))
        start += rows
    return np.concatenate(out)


def pkdpipe_int8(block: np.ndarray) -> np.ndarray:
    codes, offset, scale = codec.encode_block(block)
    return codec.decode_all(codes, offset[None], scale[None])


def mean_centred_int8(block: np.ndarray) -> np.ndarray:
    """The variant not chosen: centred on the per-dimension mean, codes to max |x - mean|."""
    mean = block.mean(0)
    scale = np.abs(block - mean).max(0) / 127
    steps = np.where(scale > 0, scale, 1)
    return mean + np.clip(np.rint((block - mean) / steps), -127, 127) * scale


def per_row_int8(x: np.ndarray) -> np.ndarray:
    """One scale per row, symmetric about zero: the outlier dimension sets every row's step."""
    scale = np.maximum(np.abs(x).max(1, keepdims=True) / 127, 1e-12)
    return np.rint(x / scale) * scale


def build_caches(args, work: Path) -> dict[str, Path]:
    """float32 (the reference), float16 and int8 caches of one teacher over one split."""
    from pkdpipe.config import CacheConfig
    from pkdpipe.demo import default_model
    from pkdpipe.teacher import cache_teacher

    teacher = make_teacher(work / "teacher", 77, base=default_model())
    caches = {}
    for name, settings in {
        "float32": {"dtype": "float32"},
        "float16": {},
        "int8": {"codec": "int8"},
    }.items():
        log(f"cache-teacher {name} over BANKING77 {args.split}")
        config = CacheConfig(
            task="banking77",
            data_dir=args.data,
            teacher=str(teacher),
            splits=(args.split,),
            cache_dir=work / "caches",
            max_seq_len=args.max_seq_len,
            device="cpu",
            quiet=True,
            **settings,
        )
        caches[name] = cache_teacher(config).path
    return caches


def layer_rows(reference: np.ndarray, shard_rows: list[int], int8_read: np.ndarray | None) -> tuple:
    """One layer's figures: variation and each codec's error, from the reference vectors."""
    n = normalised(reference)
    variation = float(np.linalg.norm(n - n.mean(0), axis=1).mean())
    int8 = int8_read if int8_read is not None else blockwise(reference, shard_rows, pkdpipe_int8)
    errors = {
        "float16": moved(reference.astype(np.float16), n),
        "int8": moved(int8, n),
        "int8 mean-centred": moved(blockwise(reference, shard_rows, mean_centred_int8), n),
        "int8 per row": moved(per_row_int8(reference), n),
    }
    return variation, errors


def bytes_per_example(path: Path) -> tuple[float, float]:
    """(shard bytes on disk, payload of the [CLS] datasets) per example of a cache."""
    with open_cache(path) as cache:
        m = cache.manifest
        layout = schema.Layout.of(m)
        shards = m.shards()
        rows = sum(s.rows for s in shards)
        vectors = sum(
            int(np.prod(shape)) * dtype.itemsize
            for s in shards
            for name, (shape, dtype) in layout.datasets(s.rows, 0).items()
            if name.startswith(schema.HIDDEN)
        )
        return sum(s.bytes for s in shards) / rows, vectors / rows


def report(caches: dict[str, Path], split: str) -> None:
    reference_path = caches.get("float32", caches.get("given"))
    with open_cache(reference_path) as ref:
        split = split if split in ref.splits else ref.splits[0]
        layers = ref.layers
        shard_rows = [s.rows for s in ref.manifest.shards(split)]
        reference = ref.read(split, layers)["hidden"].astype(np.float32)
        what = f"{ref.manifest.teacher.name_or_path}, {split}: {len(reference):,} rows, {layers} layers"
    int8_read = None
    if "int8" in caches:
        with open_cache(caches["int8"]) as c8:
            int8_read = c8.read(split, layers)["hidden"]
    rows = []
    for j, layer in enumerate(layers):
        variation, errors = layer_rows(
            reference[:, j], shard_rows, None if int8_read is None else int8_read[:, j]
        )
        varies = variation > 1e-9  # layer 0: one vector for every example (up to float rounding)
        ratio = errors["int8"] / variation if varies else float("nan")
        rows.append(
            (
                str(layer),
                f"{variation:.4g}",
                f"{errors['float16']:.2g}",
                f"**{errors['int8']:.2g}**",
                f"{ratio:.2%}" if varies else "- (one vector)",
                f"{errors['int8 mean-centred']:.2g}",
                f"{errors['int8 per row']:.2g}",
            )
        )
    print(f"[CLS] codecs: {what}\n")
    header = (
        "layer",
        "variation",
        "float16 error",
        "int8 error",
        "int8 / variation",
        "int8 mean-centred",
        "int8 per row",
    )
    print(table(rows, header))
    sizes = {name: bytes_per_example(path) for name, path in caches.items()}
    if "float16" in sizes and "int8" in sizes:
        (f16, v16), (i8, v8) = sizes["float16"], sizes["int8"]
        print()
        print(
            table(
                [
                    ("on disk (shard bytes / examples)", f"{f16:,.0f}", f"{i8:,.0f}", f"**{i8 / f16:.3f}x**"),
                    ("[CLS] vectors (payload)", f"{v16:,.0f}", f"{v8:,.0f}", f"{v8 / v16:.3f}x"),
                ],
                ("bytes per example", "float16", "int8", "int8 / float16"),
            )
        )


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    print(f"command: {command_line()}")
    print("\n".join(machine_lines()))
    if args.cache:
        report({"given": args.cache}, args.split)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        report(build_caches(args, work), args.split)


if __name__ == "__main__":
    main()

"""`pkdpipe cache-teacher` and the `pkdpipe cache ...` group: build, inspect and check caches."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from pkdpipe.config import CacheConfig
from pkdpipe_cli.common import (
    CACHE_ARG,
    CACHE_DIR,
    command_line,
    config_from,
    config_options,
    console,
    fmt_metrics,
    human_bytes,
    int_list,
    option,
)

cache_app = typer.Typer(help="Inspect, verify and share teacher caches.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("cache-teacher")(cache_teacher)
    app.add_typer(cache_app, name="cache")


@config_options(CacheConfig)
def cache_teacher(store: str = option(CacheConfig, "store", envvar="PKDPIPE_STORE"), **values):
    """Run the teacher once over a task's splits and cache its logits and every layer's [CLS] vector."""
    from pkdpipe.teacher import cache_teacher as run
    from pkdpipe.teacher import describe

    config = config_from(CacheConfig, {**values, "store": store}, command=command_line())
    result = run(config)
    from pkdpipe import distributed

    if not distributed.is_main():
        return
    summary = describe(result)
    if result.hit:
        where = "pulled from the store" if result.pulled else "found"
        console.print(f"cache hit: {where}, nothing to compute")
    table = Table(title=f"teacher cache {result.key}", show_header=False)
    table.add_row("examples", f"{summary['examples']:,}")
    table.add_row("shards", str(summary["shards"]))
    table.add_row(
        "on disk", f"{human_bytes(summary['bytes'])} ({summary['bytes_per_example']:,.0f} B/example)"
    )
    if summary["seconds"] is not None and not result.hit:
        table.add_row("time", f"{summary['seconds']:.1f} s")
    for split, metrics in summary["teacher_metrics"].items():
        table.add_row(f"teacher on {split}", fmt_metrics(metrics))
    console.print(table)
    console.print(f"cache: {result.path}", soft_wrap=True, markup=False, highlight=False)  # whole, copyable
    m = result.manifest
    float16 = m.codec == "float16" and m.hidden_dtype == "float16"
    if float16 and not result.hit and summary["bytes"] >= INT8_HINT_BYTES:
        console.print(
            f"{human_bytes(summary['bytes'])} in float16: --codec int8 stores such a cache in about half "
            "the bytes, and students from the two scored alike (docs/cache-format.md)"
        )


INT8_HINT_BYTES = 1 << 30  # from 1 GiB on, cache-teacher mentions --codec int8


@cache_app.command("info")
def info(path: str = CACHE_ARG, cache_dir: Path = CACHE_DIR):
    """Show a cache's manifest as a table."""
    from pkdpipe.cache import manifest
    from pkdpipe.cache.local import resolve_cache

    folder = resolve_cache(path, cache_dir)
    m = manifest.read(folder)
    table = Table(title=f"cache {m.key}", show_header=False)
    table.add_row("path", str(folder))
    table.add_row("task", m.task)
    t = m.teacher
    table.add_row(
        "teacher", f"{t.name_or_path} ({t.architecture}, {t.num_layers} layers, hidden {t.hidden_size})"
    )
    table.add_row("teacher weights", t.weights_sha256[:16])
    table.add_row("pre-trained from", str(t.pretrained_from))
    table.add_row("tokenizer", m.tokenizer_sha256[:16])
    table.add_row("labels", f"{m.num_labels}: {', '.join(m.label_names or ['(regression)'])[:80]}")
    table.add_row("max length", f"{m.max_seq_len} ({m.truncation})")
    table.add_row("layers", f"{m.layers} as {m.hidden_dtype}, logits {m.logits_dtype}")
    if m.partial:
        table.add_row("this copy holds", f"layers {list(m.present)} (pulled with --layers)")
    for split, s in m.splits.items():
        size = sum(x.bytes or 0 for x in s.shards)
        table.add_row(
            f"split {split}", f"{s.examples:,} examples, {len(s.shards)} shard(s), {human_bytes(size)}"
        )
    for split, metrics in m.teacher_metrics.items():
        table.add_row(f"teacher on {split}", fmt_metrics(metrics))
    sample = f" (a seeded sample of {m.dataset.train_rows:,} train rows)" if m.dataset.train_rows else ""
    table.add_row("dataset", m.dataset.source + sample)
    table.add_row("created", f"{m.created} by pkdpipe {m.tool_version}")
    table.add_row("command", m.command)
    table.add_row("timings", json.dumps(m.timings))
    console.print(table)


@cache_app.command("verify")
def verify(
    path: str = CACHE_ARG,
    cache_dir: Path = CACHE_DIR,
    recompute: int = typer.Option(0, help="Also rerun the teacher on N random cached examples and compare."),
    teacher: str = typer.Option(None, help="The teacher to recompute with (needed with --recompute)."),
    seed: int = typer.Option(0, help="Seed of the examples --recompute draws."),
    device: str = typer.Option("auto", help="Device for --recompute: cpu, cuda or auto."),
    data_dir: Path = typer.Option(
        None, help="With --recompute: also compare the examples' labels and token ids with this data."
    ),
    task: str = typer.Option(
        None, help="With --data-dir: the task file, when the task is not pkdpipe's own."
    ),
):
    """Check checksums, shapes, NaN/inf and example ids; exit 1 on any fault.

    With --recompute N --teacher PATH, also rerun the teacher on N examples: fail when a logit
    differs by more than 1e-2 or a [CLS] vector's cosine to the cached one is below 0.999
    (0.1 and 0.99 for a cache made under bf16/fp16 autocast). With --data-dir, the same examples'
    gold labels and token ids are compared with the task's data too."""
    from pkdpipe.cache.local import resolve_cache
    from pkdpipe.cache.verify import verify_cache
    from pkdpipe.errors import ConfigError

    if recompute and not teacher:
        raise ConfigError("--recompute needs --teacher PATH (the teacher the cache claims)")
    folder = resolve_cache(path, cache_dir)
    report = verify_cache(folder)
    for problem in report.problems:
        console.print(f"[red]FAIL[/red] {problem}")
    if not report.ok:
        raise typer.Exit(1)
    console.print(
        f"OK: {report.shards_checked} shard(s), {report.rows_checked:,} rows verified in {report.path}"
    )
    if recompute:
        from pkdpipe.teacher import recompute_check  # loads torch and transformers: only when asked

        r = recompute_check(folder, teacher, recompute, seed, device, data_dir=data_dir, task=task)
        for note in r.notes:
            console.print(f"[yellow]note[/yellow] {note}", soft_wrap=True)
        figures = (
            f"{r.examples} example(s) recomputed: max |logit diff| {r.max_logit_diff:.2e} (tolerance "
            f"{r.logit_tolerance:g}), lowest [CLS] cosine {r.min_cosine:.6f} at layer {r.worst_layer} "
            f"(tolerance {r.cosine_tolerance:g}), max |[CLS] diff| {r.max_hidden_diff:.2e}"
        )
        if data_dir is not None:
            figures += (
                f"; {r.data_checked} compared with the data in {data_dir}, {len(r.data_mismatches)} differ"
            )
        for mismatch in r.data_mismatches[:5]:
            console.print(f"[red]FAIL[/red] {mismatch}", soft_wrap=True, highlight=False)
        if not r.ok:
            console.print(f"[red]FAIL[/red] {figures}: this cache was not made by {teacher}", soft_wrap=True)
            raise typer.Exit(1)
        console.print(f"OK: {figures}", soft_wrap=True)


@cache_app.command("stats")
def stats(
    path: str = CACHE_ARG,
    cache_dir: Path = CACHE_DIR,
    split: str = typer.Option("train", help="Split whose rows the statistics cover."),
    layers: str = typer.Option(
        None, help="Student depths K whose layer maps to show, e.g. 3,6. Default: 2..N-1."
    ),
    top: int = typer.Option(3, help="Dimensions to name per layer."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    plot: Path = typer.Option(None, help="Also draw the varying share per layer into this PNG."),
):
    """What each cached [CLS] layer can teach: the share of it that differs between examples.

    The patient loss compares L2-normalised [CLS] vectors. Where one outlier dimension dominates
    them, the normalised vector is nearly the same for every example and the loss teaches one
    direction, not the input. Per layer: the varying share (mean over rows of |n - mean(n)|^2 for the
    normalised vectors n), the dimensions that hold most of the vector and most of what varies, and
    the maps of PKD-Skip, PKD-Last and --teacher-layers auto for each student depth."""
    from pkdpipe.cache.local import resolve_cache
    from pkdpipe.cache.reader import open_cache
    from pkdpipe.layer_signal import plot as draw
    from pkdpipe.layer_signal import signal_report

    depths = list(int_list(layers, "--layers")) if layers else None
    with open_cache(resolve_cache(path, cache_dir)) as cache:
        report = signal_report(cache, split, depths, top)
    if plot:
        draw(report, plot, depths[0] if depths else max(2, report.teacher_layers // 2))
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    _print_signal(report)
    if plot:
        console.print(f"plot: {plot}", soft_wrap=True, markup=False, highlight=False)


def _pct(share: float) -> str:
    return "0%" if share < 1e-12 else f"{100 * share:.3g}%"


def _print_signal(report) -> None:
    float16 = report.hidden_dtype == "float16"
    mapped: dict[int, list[str]] = {}
    for k, maps in report.maps.items():
        for name, chosen in maps.items():
            for layer in chosen:
                mapped.setdefault(layer, []).append(f"{name}-{k}")
    table = Table(
        title=f"{report.task} cache {report.key}: [CLS] per layer over {report.rows:,} {report.split} rows"
    )
    table.add_column("layer", justify="right")
    table.add_column("varying share", justify="right")
    table.add_column("dims holding the vector")
    table.add_column("dims holding what varies")
    if float16:
        table.add_column("fp16 rounding, standardised", justify="right")
    table.add_column("mapped by")
    for r in report.layers:
        row = [
            str(r.layer),
            _pct(r.varying_share),
            ", ".join(f"{d} ({_pct(s)})" for d, s in r.dominant),
            ", ".join(f"{d} ({_pct(s)})" for d, s in r.varying_dims) or "-",
        ]
        if float16:  # a constant layer has nothing to standardise
            row.append(_pct(r.rounding_share) if r.varying_dims else "-")
        table.add_row(*row, " ".join(mapped.get(r.layer, [])) or "-")
    console.print(table)
    maps = Table(title="teacher layers each map would name (their varying shares)")
    maps.add_column("student K", justify="right")
    names = sorted({name for m in report.maps.values() for name in m}, key=["skip", "last", "auto"].index)
    for name in names:
        maps.add_column(name)
    for k, chosen in report.maps.items():
        maps.add_row(
            str(k),
            *(
                ", ".join(f"{x} ({_pct(report.share(x))})" for x in chosen[name]) if name in chosen else "-"
                for name in names
            ),
        )
    console.print(maps)
    low = sorted({x for m in report.maps.values() for c in m.values() for x in c if report.share(x) < 0.01})
    if low:
        console.print(
            f"Layers {', '.join(map(str, low))} vary by under 1%: as targets of the paper's patient loss "
            "(--pt-space raw) they teach one direction shared by every example. Try --pt-space "
            "relational and compare with --strategy kd (docs/patient-loss.md: what each space measured).",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )


from pkdpipe_cli import store_cmd  # noqa: E402  (ls, push, pull, rm, gc join the `cache` group)

store_cmd.register(cache_app)

"""`pkdpipe cache ls | push | pull | rm | gc`: share caches through a store and tidy the local root.

Thin: parse, call `pkdpipe.cache.store`, print. Library errors (StoreError, CacheError) reach the
app's handler and print as one line.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from pkdpipe_cli.common import CACHE_ARG, CACHE_DIR, QUIET, console, human_bytes, int_list


def register(cache_app: typer.Typer) -> None:
    """Attach the commands to the `cache` group."""
    cache_app.command("ls")(ls)
    cache_app.command("push")(push)
    cache_app.command("pull")(pull)
    cache_app.command("rm")(rm)
    cache_app.command("gc")(gc)


def _plain(text) -> None:
    console.print(str(text), soft_wrap=True, markup=False, highlight=False)  # paths and URLs whole, copyable


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 3, 6, 8] -> '0-3,6,8'."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(parts)


def ls(cache_dir: Path = CACHE_DIR):
    """List the caches under the cache root: complete or not, what made them, size on disk."""
    from pkdpipe.cache.local import list_local
    from pkdpipe.paths import default_cache_root

    rows = list_local(cache_dir)
    root = cache_dir or default_cache_root()
    if not rows:
        _plain(f"no caches under {root}")
        return
    table = Table(title=f"caches under {root}", box=None, padding=(0, 1, 0, 0), header_style="bold underline")
    for column in ("task", "key", "teacher", "examples", "stored", "size", "created", "complete"):
        table.add_column(column, overflow="fold", no_wrap=column == "key")  # a key stays whole: it is copied
    for r in rows:
        examples = "\n".join(f"{split} {n:,}" for split, n in r.examples.items()) if r.examples else "-"
        table.add_row(
            r.task,
            r.key,
            r.teacher or "-",
            examples,
            f"layers {_ranges(r.layers)}{' (partial)' if r.partial else ''}\n{r.dtype}"
            if r.layers or r.partial
            else "-",
            human_bytes(r.bytes),
            r.created[:16].replace("T", "\n") if r.created else "-",  # date, then time to the minute (UTC)
            "yes" if r.complete else "[red]no[/red]",
        )
    console.print(table)


def push(
    path: str = CACHE_ARG,
    url: str = typer.Argument(
        ..., help="Store URL: a shared folder, file://, s3://, gs://, hf://, memory://"
    ),
    cache_dir: Path = CACHE_DIR,
    force: bool = typer.Option(
        False, "--force", help="Check every shard already in the store and upload the damaged ones again."
    ),
    quiet: bool = QUIET,
):
    """Publish a complete cache to a store as URL/TASK/KEY (shards first, manifest last; resumes)."""
    from pkdpipe.cache.local import resolve_cache
    from pkdpipe.cache.store import push as run

    dest = run(resolve_cache(path, cache_dir), url, quiet=quiet, force=force)
    _plain(f"in store: {dest}")


def pull(
    url_or_key: str = typer.Argument(..., help="A cache's URL (STORE/TASK/KEY), or its key with --store."),
    cache_dir: Path = CACHE_DIR,
    store: str = typer.Option(None, envvar="PKDPIPE_STORE", help="Store URL to look a key up in."),
    layers: str = typer.Option(
        None,
        help="Only these [CLS] layers, e.g. 2,4,6,8,10 for PKD-Skip 12->6 (and every row's ids, labels, "
        "logits and tokens); a later pull adds the missing ones. Default: the whole cache.",
    ),
    quiet: bool = QUIET,
):
    """Download a cache into the cache root; every checksum is verified before it becomes visible."""
    from pkdpipe.cache.store import pull as run

    folder = run(url_or_key, cache_dir, store=store, quiet=quiet, layers=int_list(layers, "--layers"))
    _plain(f"cache: {folder}")


def rm(path_or_key: str = CACHE_ARG, cache_dir: Path = CACHE_DIR):
    """Delete one local cache."""
    from pkdpipe.cache.local import remove

    folder, freed = remove(path_or_key, cache_dir)
    _plain(f"removed {folder} ({human_bytes(freed)})")


def gc(cache_dir: Path = CACHE_DIR):
    """Remove incomplete leftovers: interrupted pulls and builds, stray temporary files."""
    from pkdpipe.cache.local import gc as run

    freed = run(cache_dir)
    for path, size in freed:
        _plain(f"removed {path} ({human_bytes(size)})")
    _plain(f"freed {human_bytes(sum(size for _, size in freed))} in {len(freed)} item(s)")

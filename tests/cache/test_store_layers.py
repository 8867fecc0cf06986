"""pkdpipe.cache.store: pulls of some layers (`pull(..., layers=...)`, `cache pull KEY --layers`).

Against a real folder store holding a push of the session's tiny cache (a 4-layer teacher, layers
0-4 stored, 3 train shards and 1 dev shard).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pkdpipe.cache import extents, schema, store
from pkdpipe.cache import manifest as mf
from pkdpipe.cache.local import PARTIAL, list_caches
from pkdpipe.cache.reader import open_cache
from pkdpipe.cache.verify import verify_cache
from pkdpipe.errors import CacheError, StoreError


@pytest.fixture
def pushed(tiny_cache, tmp_path) -> tuple[str, str]:
    """(store URL, the cache's URL in it) after a push of a private copy of the session cache."""
    local = tmp_path / "built" / tiny_cache.parent.name / tiny_cache.name
    shutil.copytree(tiny_cache, local)
    url = str(tmp_path / "store")
    return url, store.push(local, url, quiet=True)


def fetches(monkeypatch) -> list[tuple[str, int]]:
    """Record each byte range a pull reads from the store, as (shard:dataset, bytes)."""
    calls: list[tuple[str, int]] = []
    real = store._fetch_range

    def counting(fs, path, extent, url):
        data = real(fs, path, extent, url)
        shard = path.rsplit("/", 1)[-1]
        name = next(n for n, e in mf_shard(path, shard).datasets.items() if e == extent)
        calls.append((f"{shard}:{name}", len(data)))
        return data

    def mf_shard(path, shard):
        folder = Path(path).parent
        return next(s for s in mf.read(folder).shards() if s.file == shard)

    monkeypatch.setattr(store, "_fetch_range", counting)
    return calls


def datasets_in(path: Path) -> set[str]:
    found = set()
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: found.add(name) if isinstance(item, h5py.Dataset) else None)
    return found


def test_a_partial_pull_verifies_and_serves_the_full_caches_values(tiny_cache, pushed, tmp_path):
    url, dest = pushed
    folder = store.pull(tiny_cache.name, tmp_path / "laptop", store=url, quiet=True, layers=[2, 4])
    assert folder == tmp_path / "laptop" / tiny_cache.parent.name / tiny_cache.name  # the same key
    manifest = mf.read(folder)
    assert manifest.key == tiny_cache.name and manifest.layers == [0, 1, 2, 3, 4]
    assert manifest.layers_present == [2, 4] and manifest.partial
    shard = manifest.shards("train")[0]
    assert datasets_in(folder / shard.file) == set(extents.needed(manifest, shard, [2, 4]))
    assert "hidden/1" not in datasets_in(folder / shard.file)
    report = verify_cache(folder)
    assert report.ok, report.problems
    size = sum(p.stat().st_size for p in folder.glob("*.h5"))
    assert size < 0.8 * sum(p.stat().st_size for p in tiny_cache.glob("*.h5"))
    with open_cache(tiny_cache) as full, open_cache(folder) as part:
        for split in ("train", "dev"):
            a, b = full.read(split, [2, 4]), part.read(split, [2, 4])
            for name in ("example_id", "labels", "logits", "hidden"):
                np.testing.assert_array_equal(a[name], b[name])
            assert all(np.array_equal(x, y) for x, y in zip(a["input_ids"], b["input_ids"]))
        assert part.layer_stats("train").keys() == {2, 4}
        np.testing.assert_array_equal(
            part.layer_stats("train")[4].to_array(), full.layer_stats("train", [4])[4].to_array()
        )
    assert not list(folder.parent.glob(f".*{PARTIAL}"))


def test_a_corrupted_byte_in_a_fetched_layer_is_refused_and_nothing_is_installed(
    tiny_cache, pushed, tmp_path
):
    url, dest = pushed
    shard = mf.read(tiny_cache).shards("train")[1]
    path = Path(dest) / shard.file
    data = bytearray(path.read_bytes())
    data[shard.datasets["hidden/2"].offset + 7] ^= 0xFF  # same size, one flipped byte in layer 2
    path.write_bytes(bytes(data))

    root = tmp_path / "laptop"
    with pytest.raises(StoreError) as err:
        store.pull(tiny_cache.name, root, store=url, quiet=True, layers=[2])
    message = str(err.value)
    assert f"checksum mismatch in {shard.file}:hidden/2" in message and "\n" not in message
    assert list_caches(root) == []
    assert not (root / tiny_cache.parent.name / tiny_cache.name).exists()
    # the checksums cover exactly what is fetched: a copy without layer 2 does not read the bad byte
    folder = store.pull(tiny_cache.name, root, store=url, quiet=True, layers=[3])
    assert verify_cache(folder).ok


def test_a_later_pull_of_more_layers_fetches_only_those(tiny_cache, pushed, tmp_path, monkeypatch):
    url, dest = pushed
    calls = fetches(monkeypatch)
    root = tmp_path / "laptop"
    store.pull(tiny_cache.name, root, store=url, quiet=True, layers=[2])
    shards = [s.file for s in mf.read(tiny_cache).shards()]
    first = {name for name, _ in calls}
    assert {f"{s}:hidden/2" for s in shards} <= first and not any(":hidden/3" in n for n in first)
    assert {f"{s}:logits" for s in shards} <= first

    calls.clear()
    folder = store.pull(tiny_cache.name, root, store=url, quiet=True, layers=[3])
    assert sorted(name for name, _ in calls) == sorted(
        f"{s}:{d}" for s in shards for d in ("hidden/3", "cls_stats/3")
    )
    manifest = mf.read(folder)
    assert manifest.layers_present == [2, 3]
    assert verify_cache(folder).ok
    calls.clear()
    assert store.pull(tiny_cache.name, root, store=url, quiet=True, layers=[2, 3]) == folder
    assert calls == []  # already here: nothing read

    store.pull(tiny_cache.name, root, store=url, quiet=True)  # the whole cache: the store's files
    for name in [mf.MANIFEST, *shards]:
        assert (folder / name).read_bytes() == (tiny_cache / name).read_bytes(), name


def test_a_copy_pulled_layer_by_layer_to_every_layer_needs_no_further_pull(
    tiny_cache, pushed, tmp_path, monkeypatch
):
    url, _ = pushed
    root = tmp_path / "laptop"
    store.pull(tiny_cache.name, root, store=url, quiet=True, layers=[0, 1, 2])
    folder = store.pull(tiny_cache.name, root, store=url, quiet=True, layers=[3, 4])
    assert mf.read(folder).present == (0, 1, 2, 3, 4)
    calls = fetches(monkeypatch)
    downloads = []
    monkeypatch.setattr(store, "_download", lambda *args: downloads.append(args[2]))
    assert store.pull(tiny_cache.name, root, store=url, quiet=True) == folder  # the whole cache
    assert calls == [] and downloads == []
    with open_cache(folder) as cache:
        cache.check_layers([1, 2, 3, 4])  # every layer readable: no "pull ... --layers" line


def test_a_run_reading_a_partial_copy_goes_on_while_a_pull_adds_layers_to_it(
    tiny_cache, pushed, tmp_path, monkeypatch
):
    """A sweep of PKD-Skip reads layer 2 while `distill --store` of another map pulls layer 4 into
    the same copy, replacing its shards: the sweep's next opening of a shard checks the datasets it
    reads again and goes on. A shard whose bytes then differ is still refused."""
    from pkdpipe.cache import reader

    url, _ = pushed
    root = tmp_path / "laptop"
    folder = store.pull(tiny_cache.name, root, store=url, quiet=True, layers=[2])
    monkeypatch.setattr(reader, "OPEN_SHARDS", 1)
    with open_cache(folder) as cache:
        before = cache.read("train", [2])["hidden"]  # every shard opened, checked and closed
        store.pull(tiny_cache.name, root, store=url, quiet=True, layers=[4])
        np.testing.assert_array_equal(cache.read("train", [2])["hidden"], before)

        first = cache.manifest.shards("train")[0]
        cache.shard(cache.manifest.shards("train")[1].file)  # closes the first
        path = folder / first.file
        with h5py.File(path, "r") as f:
            offset = f["hidden/2"].id.get_offset()  # where layer 2 lies in this copy's shard
        data = bytearray(path.read_bytes())
        data[offset + 7] ^= 0xFF
        replacement = folder / "replacement"
        replacement.write_bytes(bytes(data))
        replacement.replace(path)
        with pytest.raises(CacheError, match=f"{first.file} changed on disk since its checksum was checked"):
            cache.shard(first.file)


def pull_killed_after_two_shards(tiny_cache, url: str, root: Path, monkeypatch) -> list[str]:
    """A pull of layer 1 into `root`, interrupted once two shards are staged; the staged shards' names."""
    real, written = extents.write, []

    def interrupted(path, arrays):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path.name)
        real(path, arrays)

    monkeypatch.setattr(extents, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.pull(tiny_cache.name, root, store=url, quiet=True, layers=[1])
    monkeypatch.setattr(extents, "write", real)
    return written


def test_an_interrupted_partial_pull_resumes_from_the_shards_it_finished(
    tiny_cache, pushed, tmp_path, monkeypatch
):
    url, dest = pushed
    root = tmp_path / "laptop"
    written = pull_killed_after_two_shards(tiny_cache, url, root, monkeypatch)
    assert list_caches(root) == []  # nothing visible
    calls = fetches(monkeypatch)
    folder = store.pull(tiny_cache.name, root, store=url, quiet=True, layers=[1])
    assert {name.split(":")[0] for name, _ in calls} == {s.file for s in mf.read(tiny_cache).shards()} - set(
        written
    )
    assert verify_cache(folder).ok


def test_an_interrupted_partial_pull_resumed_with_more_layers_fetches_only_what_it_lacks(
    tiny_cache, pushed, tmp_path, monkeypatch
):
    url, dest = pushed
    root = tmp_path / "laptop"
    written = pull_killed_after_two_shards(tiny_cache, url, root, monkeypatch)
    calls = fetches(monkeypatch)
    folder = store.pull(tiny_cache.name, root, store=url, quiet=True, layers=[1, 2])
    for shard in written:  # staged whole for layer 1: only layer 2's datasets come from the store
        assert sorted(n.split(":")[1] for n, _ in calls if n.startswith(f"{shard}:")) == [
            "cls_stats/2",
            "hidden/2",
        ]
    others = {s.file for s in mf.read(tiny_cache).shards()} - set(written)
    assert others and all(any(n == f"{s}:hidden/1" for n, _ in calls) for s in others)
    assert mf.read(folder).layers_present == [1, 2] and verify_cache(folder).ok


def test_a_strategy_needing_an_absent_layer_fails_with_the_pull_to_run(tiny_cache, pushed, tmp_path):
    url, _ = pushed
    folder = store.pull(tiny_cache.name, tmp_path / "laptop", store=url, quiet=True, layers=[2])
    with open_cache(folder) as cache, pytest.raises(CacheError) as err:
        next(cache.stream("train", 8, [3], epoch=0, seed=0))
    message = str(err.value)
    assert f"pkdpipe cache pull {tiny_cache.name} --layers 3" in message and "\n" not in message


def test_distill_with_store_pulls_only_the_layers_its_map_needs_and_trains(
    tiny, tiny_cache, pushed, tmp_path
):
    from pkdpipe.config import DistillConfig
    from pkdpipe.train import distill

    url, _ = pushed

    def run(name: str, teacher_layers):
        return distill(
            DistillConfig(
                cache=tiny_cache.name[:8],
                cache_dir=tmp_path / "laptop",
                store=url,
                strategy="skip",
                teacher_layers=teacher_layers,
                student_init=str(tiny["pretrained"]),
                layers=2,
                max_steps=2,
                batch_size=16,
                quiet=True,
                output=tmp_path / name,
                device="cpu",
            )
        )

    run("a", (3,))
    folder = tmp_path / "laptop" / tiny_cache.parent.name / tiny_cache.name
    assert mf.read(folder).layers_present == [3]
    assert (tmp_path / "a" / "model.safetensors").is_file()
    run("b", (1,))  # another map: its layer is added to the copy
    assert mf.read(folder).layers_present == [1, 3]


def test_sweep_with_store_pulls_the_union_of_its_runs_maps(tiny, tiny_cache, pushed, tmp_path):
    """`sweep --store` over kd and skip at two depths: the copy holds the layers of the two skip
    maps and no other (kd maps none), and every run trains from it."""
    from pkdpipe_cli.main import app
    from typer.testing import CliRunner

    from pkdpipe.strategies import get

    url, _ = pushed
    root = tmp_path / "laptop"
    args = ["sweep", "--cache", tiny_cache.name[:8], "--cache-dir", str(root), "--store", url]
    args += ["--strategy", "kd,skip", "--layers", "1,2", "--student-init", str(tiny["pretrained"])]
    args += ["--max-steps", "1", "--batch-size", "16", "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "sweep")])
    assert result.exit_code == 0, result.output

    maps = {layer for depth in (1, 2) for layer in get("skip").layer_map(4, depth, None)}
    assert maps and maps < {1, 2, 3}  # some of the candidate layers, not all
    folder = root / tiny_cache.parent.name / tiny_cache.name
    assert mf.read(folder).layers_present == sorted(maps)
    runs = [p for p in (tmp_path / "sweep").iterdir() if p.is_dir()]
    assert sorted(p.name.split("_")[0] for p in runs) == ["kd-1", "kd-2", "skip-1", "skip-2"]
    assert all((p / "model.safetensors").is_file() for p in runs)


def test_an_old_manifest_without_per_dataset_checksums_falls_back_to_a_full_pull(
    tiny_cache, pushed, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("PKDPIPE_QUIET", raising=False)
    url, dest = pushed
    path = Path(dest) / mf.MANIFEST
    data = json.loads(path.read_text())
    for info in data["splits"].values():
        for shard in info["shards"]:
            del shard["datasets"]
    path.write_text(json.dumps(data))

    folder = store.pull(tiny_cache.name, tmp_path / "laptop", store=url, layers=[2])
    assert "made before per-dataset checksums: pulling all of it" in capsys.readouterr().err
    manifest = mf.read(folder)
    assert not manifest.partial and manifest.present == (0, 1, 2, 3, 4)
    for shard in manifest.shards():
        assert (folder / shard.file).read_bytes() == (tiny_cache / shard.file).read_bytes()


def test_refusals_unknown_layers_and_pushing_a_partial_copy(tiny_cache, pushed, tmp_path):
    url, _ = pushed
    with pytest.raises(StoreError, match=r"stores layers \[0, 1, 2, 3, 4\], not \[9\]"):
        store.pull(tiny_cache.name, tmp_path / "laptop", store=url, quiet=True, layers=[2, 9])
    folder = store.pull(tiny_cache.name, tmp_path / "laptop", store=url, quiet=True, layers=[2])
    with pytest.raises(CacheError, match="is a partial copy"):
        store.push(folder, str(tmp_path / "other-store"), quiet=True)


def test_a_corrupted_local_dataset_of_a_partial_copy_is_found_by_verify_and_the_reader(
    tiny_cache, pushed, tmp_path
):
    url, _ = pushed
    folder = store.pull(tiny_cache.name, tmp_path / "laptop", store=url, quiet=True, layers=[2])
    shard = mf.read(folder).shards("train")[0]
    with h5py.File(folder / shard.file, "r+") as f:
        f[schema.LOGITS][0, 0] += 1.0
    report = verify_cache(folder)
    assert any(f"{shard.file}: logits does not match its checksum" in p for p in report.problems)
    with open_cache(folder) as cache, pytest.raises(CacheError, match="checksum mismatch"):
        cache.read("train", [2])


def test_a_manifest_whose_present_layers_are_not_stored_is_refused(tiny_cache, tmp_path):
    folder = tmp_path / "root" / tiny_cache.parent.name / tiny_cache.name
    shutil.copytree(tiny_cache, folder)
    data = json.loads((folder / mf.MANIFEST).read_text())
    data["layers_present"] = [2, 7]
    (folder / mf.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(CacheError, match="layers_present"):
        mf.read(folder)


def test_local_or_pull_fetches_only_what_the_local_copy_lacks(tiny_cache, pushed, tmp_path, monkeypatch):
    url, _ = pushed
    root = tmp_path / "laptop"
    folder = store.pull(tiny_cache.name, root, store=url, quiet=True, layers=[2])
    calls = fetches(monkeypatch)
    assert store.local_or_pull(tiny_cache.name[:8], root, url, quiet=True, layers=[]) == folder  # kd
    assert store.local_or_pull(tiny_cache.name[:8], root, url, quiet=True, layers=[2]) == folder
    assert calls == [] and mf.read(folder).layers_present == [2]
    assert store.local_or_pull(tiny_cache.name[:8], root, url, quiet=True) == folder  # all of it
    assert not mf.read(folder).partial and verify_cache(folder).ok


def test_an_extent_whose_size_does_not_fit_its_dataset_is_refused_before_it_is_read(
    tiny_cache, pushed, tmp_path, monkeypatch
):
    url, dest = pushed
    path = Path(dest) / mf.MANIFEST
    data = json.loads(path.read_text())
    shard = data["splits"]["train"]["shards"][0]
    shard["datasets"]["hidden/2"]["bytes"] += 2
    path.write_text(json.dumps(data))
    calls = fetches(monkeypatch)
    with pytest.raises(StoreError, match=f"{shard['file']}:hidden/2 is not"):
        store.pull(tiny_cache.name, tmp_path / "laptop", store=url, quiet=True, layers=[2])
    assert not any(name.endswith(":hidden/2") for name, _ in calls)
    assert list_caches(tmp_path / "laptop") == []

"""Rank/worker splits are disjoint, every rank yields the same number of full batches, and resuming is exact."""

import io
import itertools
import tarfile

import pytest
from PIL import Image

from ldm.data import ShardWriter, make_dataloader
from ldm.data.distributed import EndlessBatches
from ldm.data.distributed import assign_units, dist_info

SIZES = [1, 3, 5, 2, 8, 4, 6, 0]  # uneven shards, one empty: 29 samples


def make_uneven_shards(tmp_path, sizes=SIZES) -> list[str]:
    paths = []
    for s, n in enumerate(sizes):
        with ShardWriter(str(tmp_path / f"u{s}-%06d.tar")) as w:
            for i in range(n):
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), (s * 30, i * 30, 0)).save(buf, format="PNG")
                w.write({"__key__": f"s{s}_{i}", "png": buf.getvalue(), "txt": f"shard {s} item {i}"})
        if n == 0:  # an empty shard
            tarfile.open(tmp_path / f"u{s}-000000.tar", "w").close()
        paths.append(str(tmp_path / f"u{s}-000000.tar"))
    return paths


def epoch_keys(loader) -> list[list[str]]:
    return [b["key"] for b in loader]


def test_assign_units_disjoint_and_complete():
    units = list(range(23))
    for world, workers in [(3, 2), (2, 4), (1, 1)]:
        got = [assign_units(units, r, world, w, workers, seed=5, epoch=1)
               for r, w in itertools.product(range(world), range(workers))]
        flat = [u for us, stride, _ in got for u in us]
        assert sorted(flat) == units and all(stride == 1 for _, stride, _ in got)
    few = [assign_units(units[:2], r, 3, 0, 1, 0, 0) for r in range(3)]
    assert all(us == few[0][0] and stride == 3 for us, stride, _ in few) and [o for *_, o in few] == [0, 1, 2]
    assert assign_units(units, 0, 3, 0, 1, 0, 0) != assign_units(units, 0, 3, 0, 1, 0, 1)  # reshuffled per epoch


@pytest.mark.parametrize("shards", ["many", "few"])
def test_three_ranks_equal_full_batches_disjoint(tmp_path, shards):
    paths = make_uneven_shards(tmp_path) if shards == "many" else make_uneven_shards(tmp_path, [9, 11])
    n = 29 if shards == "many" else 20
    batch = 2
    per_rank = [epoch_keys(make_dataloader(paths, batch, rank=r, world_size=3, num_samples=n, seed=3,
                                           shuffle_buffer=4)) for r in range(3)]
    assert [len(k) for k in per_rank] == [n // (3 * batch)] * 3  # 4 (many) / 3 (few) batches on every rank
    assert all(len(b) == batch for keys in per_rank for b in keys)
    sets = [set(itertools.chain(*keys)) for keys in per_rank]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    if shards == "few":  # strided split: each rank keeps every third sample of the shared stream, no repeats
        assert all(len(s) == 2 * len(keys) for s, keys in zip(sets, per_rank, strict=True))


def test_rank_from_explicit_or_default():
    assert dist_info() == (0, 1) and dist_info(2, 3) == (2, 3)
    with pytest.raises(ValueError, match="rank=3"):
        dist_info(3, 3)


def test_too_few_samples_raises(tmp_path):
    with pytest.raises(ValueError, match="cannot fill one batch"):
        make_dataloader(make_uneven_shards(tmp_path, [2]), 4, rank=0, world_size=1, num_samples=2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact(tmp_path, num_workers):
    paths = make_uneven_shards(tmp_path)
    kw = dict(rank=1, world_size=2, num_samples=29, seed=7, num_workers=num_workers, shuffle_buffer=3)
    full = make_dataloader(paths, 2, **kw)
    epoch0, epoch1 = epoch_keys(full), epoch_keys(full)
    assert len(epoch0) == len(full) == 7 and epoch0 != epoch1 and full.state_dict()["epoch"] == 2
    part = make_dataloader(paths, 2, **kw)
    seen = list(itertools.islice(iter(part), 3))
    state = part.state_dict()
    assert state["epoch"] == 0 and state["batches_consumed"] == 3
    resumed = make_dataloader(paths, 2, **kw)
    resumed.load_state_dict(state)
    rest = epoch_keys(resumed)
    assert [b["key"] for b in seen] + rest == epoch0
    assert epoch_keys(resumed) == epoch1  # continues with the next epoch
    at_end = make_dataloader(paths, 2, **kw)
    assert len(list(itertools.islice(iter(at_end), 7))) == 7  # stopped right after the last batch
    assert epoch_keys(at_end) == epoch1
    with pytest.raises(ValueError, match="batch_size"):
        make_dataloader(paths, 4, **kw).load_state_dict(state)


@pytest.mark.parametrize("num_workers,start", [(0, 0), (2, 0), (3, 5), (2, 13)])
def test_endless_stream_equals_epoch_by_epoch(tmp_path, num_workers, start):
    """One DataLoader for the whole run gives exactly the batches of walking the epochs one by one (7 batches per
    epoch, not a multiple of the worker count, so the logical workers rotate at each epoch boundary)."""
    paths = make_uneven_shards(tmp_path)
    kw = dict(rank=1, world_size=2, num_samples=29, seed=7, shuffle_buffer=3, num_workers=num_workers)
    ref = make_dataloader(paths, 2, **kw)
    epochs = [b for _ in range(4) for b in epoch_keys(ref)]  # 28 batches, epochs 0..3
    loader = make_dataloader(paths, 2, **kw)
    loader.load_state_dict({"epoch": start // 7, "batches_consumed": start % 7})
    got = [b["key"] for b in itertools.islice(loader.endless(), 28 - start)]
    assert got == epochs[start:]
    assert loader.state_dict()["epoch"] == 4 and loader.state_dict()["batches_consumed"] == 0
    with pytest.raises(TypeError, match="never ends"):
        len(EndlessBatches(loader.source, 2))

"""MemberCache in the process (the job tests use it through subprocesses too): an entry's round trip,
its checksum, damage, a second writer, checkpoints. Written for the mutants of runner/cache.py that the
job tests could not reach (benchmarks/mutation.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from runner.cache import MemberCache, file_sha256


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_an_entry_round_trips_the_weights_and_the_meta_with_the_weights_checksum(tmp_path):
    cache = MemberCache(str(tmp_path / "a" / "b"))  # folders made as needed
    cache.check_writable()
    sha = cache.save("k1", net(0), {"seed": 0, "where": tmp_path})  # a Path in the meta is written as text
    entry = tmp_path / "a" / "b" / "members" / "k1"
    assert sha == file_sha256(entry / "model.pt")
    assert json.loads((entry / "meta.json").read_text()) == {"seed": 0, "where": str(tmp_path), "sha256": sha}
    into = net(1)
    meta = cache.load("k1", into)
    assert meta == {"seed": 0, "where": str(tmp_path), "sha256": sha}
    assert all(torch.equal(a, b) for a, b in zip(into.state_dict().values(), net(0).state_dict().values()))
    assert sorted(p.name for p in entry.parent.iterdir()) == ["k1"]  # no temporary folder left


def test_a_damaged_entry_is_a_miss_and_is_removed(tmp_path, caplog):
    cache = MemberCache(str(tmp_path))
    cache.save("k", net(0), {})
    model = tmp_path / "members" / "k" / "model.pt"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    into = net(1)
    before = {k: v.clone() for k, v in into.state_dict().items()}
    assert cache.load("k", into) is None
    assert not (tmp_path / "members" / "k").exists() and "checksum mismatch" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in into.state_dict().items())


def test_a_second_writer_of_one_key_keeps_the_first_entry(tmp_path):
    cache = MemberCache(str(tmp_path))
    first = cache.save("k", net(0), {"n": 1})
    second = cache.save("k", net(1), {"n": 2})
    assert first != second and file_sha256(tmp_path / "members" / "k" / "model.pt") == first
    assert cache.load("k", net(2)) == {"n": 1, "sha256": first}
    assert [p.name for p in (tmp_path / "members").iterdir()] == ["k"]


def test_no_cache_folder_means_no_entry_and_no_checkpoint():
    cache = MemberCache(None)
    cache.check_writable()
    assert cache.entry("k") is None and cache.save("k", net(), {}) is None and cache.load("k", net()) is None
    assert cache.checkpoint("k") == (None, None)
    cache.drop_checkpoint("k")


def test_a_readable_checkpoint_is_resumed_from_and_dropping_one_keeps_the_others(tmp_path):
    cache = MemberCache(str(tmp_path))
    callback, resume_from = cache.checkpoint("k")
    folder = tmp_path / "checkpoints" / "k"
    assert resume_from is None and Path(callback.dirpath) == folder and callback.filename == "last"
    assert callback.save_top_k == 1
    folder.mkdir(parents=True)
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(2, device="cpu")}}, folder / "last.ckpt")
    assert cache.checkpoint("k")[1] == str(folder / "last.ckpt")
    other = tmp_path / "checkpoints" / "other"
    other.mkdir()
    cache.drop_checkpoint("k")
    assert not folder.exists() and other.exists()

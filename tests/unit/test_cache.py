"""MemberCache in the process (the job tests use it through subprocesses too): an entry's round trip,
its checksum, damage, a second writer, checkpoints. Written for the mutants of runner/cache.py that the
job tests could not reach (benchmarks/mutation.py)."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import runner.cache
from runner.cache import MemberCache, code_digest, file_sha256
from runner.errors import ConfigError
from runner.models import MLP
from runner.train import train_classifier


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
    assert not (tmp_path / "members" / "k").exists()
    [record] = [r for r in caplog.records if r.name == "runner.cache"]
    assert record.getMessage() == "member cache entry k is corrupt (checksum mismatch); retraining"
    assert all(torch.equal(before[k], v) for k, v in into.state_dict().items())


def test_a_damaged_entry_another_job_removed_first_is_still_a_miss(tmp_path, monkeypatch):
    """Two jobs of a parallel sweep that find one damaged entry both discard it: the second finds it gone."""
    cache = MemberCache(str(tmp_path))
    cache.save("k", net(0), {})
    entry = tmp_path / "members" / "k"

    def removed_meanwhile(path):
        shutil.rmtree(entry)  # the other job, between this one's read and its discard
        raise OSError("damaged")

    monkeypatch.setattr(runner.cache, "file_sha256", removed_meanwhile)
    assert cache.load("k", net(1)) is None and not entry.exists()


class Planted:
    """Unpickles as a tensor by calling torch.zeros: code run at load time, which an entry may not hold."""

    def __reduce__(self):
        return torch.zeros, (3, 4)


def test_an_entry_whose_pickle_runs_code_is_refused_even_with_a_matching_checksum(tmp_path):
    cache = MemberCache(str(tmp_path))
    cache.save("k", net(0), {})
    entry = tmp_path / "members" / "k"
    state = {k: v for k, v in net(0).state_dict().items()}
    state["0.weight"] = Planted()  # a valid state dict once unpickled: only weights_only refuses it
    torch.save(state, entry / "model.pt")
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({**meta, "sha256": file_sha256(entry / "model.pt")}))
    assert cache.load("k", net(1)) is None and not entry.exists()


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


def test_an_unwritable_cache_folder_is_refused_naming_it(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    with pytest.raises(ConfigError) as e:
        MemberCache(str(blocked / "cache")).check_writable()
    assert e.value.key == "cache.dir" and e.value.value == str(blocked / "cache")
    assert "a folder this process can write, or null to disable the cache (NotADirectoryError: " in str(e.value)


def test_an_unreadable_checkpoint_is_named_in_the_warning_and_dropping_a_missing_one_is_fine(tmp_path, caplog):
    cache = MemberCache(str(tmp_path))
    last = tmp_path / "checkpoints" / "k" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"not a checkpoint")
    assert cache.checkpoint("k")[1] is None
    [record] = [r for r in caplog.records if "unreadable" in r.getMessage()]
    with pytest.raises(Exception) as e:  # what torch says about the file, as the warning must quote it
        torch.load(io.BytesIO(b"not a checkpoint"), weights_only=False)
    assert record.getMessage() == (
        f"checkpoint {last} is unreadable ({type(e.value).__name__}: {e.value}); discarded, training from scratch"
    )
    assert type(e.value).__name__ == "UnpicklingError"
    cache.drop_checkpoint("never-trained")  # nothing to drop: no error


def test_the_checkpoint_is_written_every_epoch_and_overwritten_on_a_resume(tmp_path, mnist1d_small):
    cache = MemberCache(str(tmp_path))
    trainer = {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False}
    trainer |= {"limit_train_batches": 2, "limit_val_batches": 1}
    optim = {"name": "adam", "lr": 1e-2}
    callback, _ = cache.checkpoint("k")
    train_classifier(MLP(40, 10), mnist1d_small, trainer, optim, callbacks=[callback])
    folder = tmp_path / "checkpoints" / "k"
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]  # after epoch 1 of 1
    callback, resume_from = cache.checkpoint("k")
    assert resume_from == str(folder / "last.ckpt")
    train_classifier(MLP(40, 10), mnist1d_small, {**trainer, "max_epochs": 2}, optim, callbacks=[callback])
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]  # the same file, no last-v1.ckpt
    assert torch.load(folder / "last.ckpt", weights_only=False)["epoch"] == 1  # epochs 0 and 1 done


def test_digest_is_the_sha256_of_the_sorted_json_less_the_ignored_keys_at_every_depth():
    import hashlib

    from runner.cache import digest

    spec = {"b": 1, "a": [1, {"cache_dir": "x", "z": (2, 3)}], "eval_batch_size": 9, "p": Path("q")}
    expected = json.dumps({"a": [1, {"z": [2, 3]}], "b": 1, "p": "q"}, sort_keys=True)
    assert digest(spec) == hashlib.sha256(expected.encode()).hexdigest()[:20]
    assert digest({"x": 1, "y": 2}) == digest({"y": 2, "x": 1})  # key order never changes a key
    assert digest({"x": [1, 2]}) != digest({"x": [2, 1]})  # list order does


def test_source_digest_covers_each_files_path_and_bytes_in_path_order(tmp_path):
    import hashlib

    from runner.cache import source_digest

    (tmp_path / "pkg").mkdir()
    (tmp_path / "b.py").write_bytes(b"print(2)\n")
    (tmp_path / "pkg" / "a.py").write_bytes(b"x = 1\n")
    (tmp_path / "notes.txt").write_bytes(b"not code")
    h = hashlib.sha256()
    for rel, data in (("b.py", b"print(2)\n"), ("pkg/a.py", b"x = 1\n")):
        h.update(rel.encode() + b"\0" + data)
    assert source_digest(tmp_path) == h.hexdigest()[:16]
    only = hashlib.sha256(b"b.py\0print(2)\n").hexdigest()[:16]
    assert source_digest(tmp_path, ("b.py",)) == only


USER_MODEL = "from torch import nn\n\nclass Tiny(nn.Linear):\n    pass\n"


def _module_from(folder: Path, name: str, source: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(source)
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_code_digest_walks_submodules_and_names_only_code_outside_the_runner(tmp_path, monkeypatch):
    """A user's layer inside a torch container counts (the container's class alone would miss it); the
    runner's own classes are covered by the runner's digest, not one by one."""
    user = _module_from(tmp_path / "mine", "user_layer", USER_MODEL)
    monkeypatch.setitem(sys.modules, "user_layer", user)
    digest = code_digest([nn.Sequential(user.Tiny(2, 2)), MLP(4, 2)])
    assert digest == {
        "runner": code_digest([])["runner"],
        "torch": torch.__version__,
        "user_layer": file_sha256(tmp_path / "mine" / "user_layer.py")[:16],
    }


def test_code_digest_covers_a_library_without_a_version_by_its_file_and_skips_fileless_modules(tmp_path, monkeypatch):
    """A library is installed under site-packages (or dist-packages, Debian's system Python's) and is
    named by its version, by its file's digest without one; a notebook's classes have no file."""
    site = tmp_path / "site-packages"
    lib = _module_from(site, "versionless_lib", USER_MODEL)
    monkeypatch.setitem(sys.modules, "versionless_lib", lib)
    debian = _module_from(tmp_path / "dist-packages", "debian_lib", USER_MODEL + '__version__ = "1.2"\n')
    monkeypatch.setitem(sys.modules, "debian_lib", debian)
    cell = types.ModuleType("notebook_cell")  # a notebook's or REPL's classes: no file to read
    monkeypatch.setitem(sys.modules, "notebook_cell", cell)
    cell.Tiny = type("Tiny", (nn.Linear,), {"__module__": "notebook_cell"})
    digest = code_digest([lib.Tiny(2, 2), cell.Tiny(2, 2), debian.Tiny(2, 2)])
    assert digest == {
        "debian_lib": "1.2",
        "runner": code_digest([])["runner"],
        "torch": torch.__version__,
        "versionless_lib": file_sha256(site / "versionless_lib.py")[:16],
    }

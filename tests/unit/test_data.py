import numpy as np
import pytest
import torch

from runner.data import MNIST1D, SklearnDataset, TensorBatches
from runner.errors import ConfigError

SKLEARN = {"digits": (64, 10), "wine": (13, 3), "breast_cancer": (30, 2)}


def sk(name: str, **kwargs) -> SklearnDataset:
    f, c = SKLEARN[name]
    return SklearnDataset(name, num_features=f, num_classes=c, **kwargs)


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.tobytes() for r in x.numpy()}


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    dm = MNIST1D(num_samples=1000, cache_dir=str(tmp_path_factory.mktemp("d")))
    dm.setup()
    return dm


def test_mnist1d_shapes_and_split_sizes(mnist):
    (xtr, ytr), (xva, yva), (xte, yte) = (mnist.splits[s] for s in ("train", "val", "test"))
    assert xtr.shape[1] == xva.shape[1] == xte.shape[1] == 40
    assert (len(ytr), len(yva), len(yte)) == (720, 80, 200)
    assert set(ytr.tolist()) == set(range(10))


@pytest.mark.parametrize("name", ["mnist1d", "wine", "breast_cancer"])
def test_no_leakage_between_splits(name, mnist):
    dm = mnist if name == "mnist1d" else sk(name)
    dm.setup()
    train, val, test = (rows(dm.splits[s][0]) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)


@pytest.mark.parametrize("name", sorted(SKLEARN))
def test_sklearn_splits_are_seeded_and_stratified(name):
    a, b, c = (sk(name, split_seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.splits["val"][0], b.splits["val"][0])
    assert not torch.equal(a.splits["val"][0], c.splits["val"][0])
    total = sum(len(a.splits[s][1]) for s in ("train", "val", "test"))
    assert total == {"digits": 1797, "wine": 178, "breast_cancer": 569}[name]
    assert set(a.splits["test"][1].tolist()) == set(range(SKLEARN[name][1]))
    train_x = a.splits["train"][0]  # standardized on train statistics
    assert torch.allclose(train_x.mean(0), torch.zeros(train_x.shape[1]), atol=1e-4)


def test_mnist1d_cache_is_reused_and_rebuilt_when_corrupt(tmp_path):
    first = MNIST1D(num_samples=500, cache_dir=str(tmp_path))
    first.setup()
    [cached] = list(tmp_path.glob("mnist1d-*.npz"))
    cached.write_bytes(b"not an npz")
    again = MNIST1D(num_samples=500, cache_dir=str(tmp_path))
    again.setup()
    assert torch.equal(first.splits["test"][0], again.splits["test"][0])
    with np.load(cached) as f:
        assert f["x"].shape == (400, 40)


def test_tensor_batches_cover_every_sample_once_and_reshuffle():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    batches = TensorBatches(x, y, batch_size=3, shuffle=True, seed=0)
    assert len(batches) == 4
    epoch1 = torch.cat([b[1] for b in batches])
    epoch2 = torch.cat([b[1] for b in batches])
    assert sorted(epoch1.tolist()) == list(range(10)) == sorted(epoch2.tolist())
    assert not torch.equal(epoch1, epoch2)
    again = torch.cat([b[1] for b in TensorBatches(x, y, 3, shuffle=True, seed=0)])
    assert torch.equal(epoch1, again)
    assert torch.equal(torch.cat([b[1] for b in TensorBatches(x, y, 3)]), y)


def test_bad_data_arguments_name_the_key():
    with pytest.raises(ConfigError, match="data.name='iris'.*breast_cancer"):
        SklearnDataset("iris", num_features=4, num_classes=3)
    with pytest.raises(ConfigError, match="data.val_fraction"):
        MNIST1D(val_fraction=1.5)
    dm = SklearnDataset("wine", num_features=12, num_classes=3)
    with pytest.raises(ConfigError, match="data.num_features=12.*13"):
        dm.setup()


def _load_test_split(cache_dir: str) -> torch.Tensor:
    dm = MNIST1D(num_samples=500, cache_dir=cache_dir)
    dm.setup()
    return dm.splits["test"][0]


def test_concurrent_writers_of_the_mnist1d_cache_do_not_collide(tmp_path):
    # separate processes, like parallel sweep jobs (mnist1d seeds numpy's global RNG, so not threads)
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(3) as pool:
        results = list(pool.map(_load_test_split, [str(tmp_path)] * 3))
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert [p.name for p in tmp_path.iterdir()] == [next(tmp_path.glob("mnist1d-*.npz")).name]


def test_random_shift_moves_a_sample_within_bounds_and_keeps_its_shape():
    from runner.data import RandomShift

    image = torch.zeros(1, 5, 5)
    image[0, 2, 2] = 1.0
    torch.manual_seed(0)
    seen = set()
    for _ in range(200):
        out = RandomShift(max_shift=1)(image)
        assert out.shape == image.shape and out.sum() == 1.0
        seen.add(tuple(int(i) for i in out[0].nonzero()[0]))
    assert seen == {(r, c) for r in (1, 2, 3) for c in (1, 2, 3)}  # every shift of -1, 0, 1 per axis
    signal = torch.arange(6.0).view(1, 6)
    assert torch.equal(RandomShift(max_shift=0)(signal), signal)
    shifted = RandomShift(max_shift=2)(signal)
    assert shifted.shape == (1, 6) and set(shifted[0].tolist()) <= set(range(6))
    with pytest.raises(ConfigError, match="max_shift"):
        RandomShift(max_shift=-1)

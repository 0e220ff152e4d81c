"""Study subsets: nested growing N, disjoint pairs, a held-out test set that never overlaps, fractions, errors."""

from __future__ import annotations

import pytest

from ditscale.cli import main
from ditscale.data import build_shards, iter_dataset, make_subset, read_manifest
from ditscale.errors import DataError
from tests.test_data_convert import write_image


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits") / "d8"
    build_shards("digits", None, str(out), resolution=8, progress=False)
    return str(out / "manifest.json")


def indices(url: str) -> set[int]:
    return set(read_manifest(url)["subset"]["indices"])


def test_growing_subsets_are_nested_and_seeded(digits, tmp_path):
    sizes = [10, 100, 1000]
    sets = [indices(make_subset(digits, n, str(tmp_path / f"n{n}"), seed=3)["train"]) for n in sizes]
    assert [len(s) for s in sets] == sizes and sets[0] <= sets[1] <= sets[2]
    other = indices(make_subset(digits, 100, str(tmp_path / "other"), seed=4)["train"])
    assert other != sets[1]
    m = read_manifest(str(tmp_path / "n100"))
    assert m["num_samples"] == 100 and m["subset"]["parent"] == digits and m["subset"]["nested"] is True
    got = [i for _, _, i in iter_dataset(str(tmp_path / "n100"))]
    assert got == sorted(sets[1])  # materialised in index order


def test_pair_is_disjoint_and_test_is_held_out(digits, tmp_path):
    urls = make_subset(digits, 300, str(tmp_path / "p"), seed=0, pair=True)
    s1, s2 = indices(urls["s1"]), indices(urls["s2"])
    assert len(s1) == len(s2) == 300 and not s1 & s2
    assert s1 == indices(make_subset(digits, 300, str(tmp_path / "single"), seed=0)["train"])
    test = {i for _, _, i in iter_dataset(urls["test"])}
    train_all = {i for _, _, i in iter_dataset(digits)}
    assert len(test) == 297 and not test & train_all  # digits' own test split
    assert read_manifest(urls["s1"])["splits"]["test"] == "../test/manifest.json"


def test_held_out_carved_from_train_when_no_test_split(tmp_path):
    for i in range(60):
        write_image(tmp_path / "imgs" / f"{i:03d}.png", i, (12, 12))
    build_shards("folder", str(tmp_path / "imgs"), str(tmp_path / "f"), resolution=8, progress=False)
    a = make_subset(str(tmp_path / "f"), 20, str(tmp_path / "a"), seed=0)
    b = make_subset(str(tmp_path / "f"), 0.5, str(tmp_path / "b"), seed=9, pair=True)
    ta, tb = indices(a["test"]), indices(b["test"])
    assert ta == tb and len(ta) == 6  # one held-out set per dataset, whatever the seed and size
    assert not ta & indices(a["train"]) and not tb & (indices(b["s1"]) | indices(b["s2"]))
    assert len(indices(b["s1"])) == 27  # 0.5 of the 54-sample pool


def test_too_large_and_cli(digits, tmp_path, capsys):
    with pytest.raises(DataError, match="needs 1600 samples"):
        make_subset(digits, 800, str(tmp_path / "x"), pair=True)
    assert main(["data", "subset", "--manifest", digits, "--size", "10", "--out", str(tmp_path / "c")]) == 0
    assert "train: " in capsys.readouterr().out
    assert main(["data", "subset", "--manifest", digits, "--size", "5000", "--out", str(tmp_path / "d")]) == 2
    assert "training pool" in capsys.readouterr().err

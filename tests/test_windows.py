import pytest

from ditscale.errors import ConfigError, WindowSpecError
from ditscale.model import PRESETS, format_windows, parse_windows, placement_indices

G = None


@pytest.mark.parametrize(
    "spec,depth,expected",
    [
        ("global", 4, [G, G, G, G]),
        (None, 3, [G, G, G]),
        ("", 2, [G, G]),
        ("local", 8, [3, 5, 7, 9, 11, 13, G, G]),
        ("local@head", 7, [3, 5, 7, 9, 11, 13, G]),
        ("local@tail", 8, [G, G, 3, 5, 7, 9, 11, 13]),
        ("local*@head", 9, [3, 3, 3, 5, 5, 5, 7, 7, 7]),
        ("5x6", 8, [5, 5, 5, 5, 5, 5, G, G]),
        ("3x2,5x2,7x2", 6, [3, 3, 5, 5, 7, 7]),
        ("3x2, 5x2 ,7x2@tail", 8, [G, G, 3, 3, 5, 5, 7, 7]),
        ("3,5,7,-,-,...", 7, [3, 5, 7, G, G, G, G]),
        ("-,3,-x2,5", 6, [G, 3, G, G, 5, G]),
        ("1", 2, [1, G]),
        ("LOCAL@Head", 6, [3, 5, 7, 9, 11, 13]),
    ],
)
def test_parse(spec, depth, expected):
    assert parse_windows(spec, depth) == expected


def test_mix_definition():
    # floor(i * (D-1) / (m-1) + 1/2): spread from the first block to the last
    assert placement_indices(6, 12, "mix") == [0, 2, 4, 7, 9, 11]
    assert placement_indices(9, 12, "mix") == [0, 1, 3, 4, 6, 7, 8, 10, 11]
    assert placement_indices(2, 12, "mix") == [0, 11]
    assert placement_indices(1, 12, "mix") == [0]
    assert placement_indices(4, 4, "mix") == [0, 1, 2, 3]
    assert parse_windows("local@mix", 12) == [3, G, 5, G, 7, G, G, 9, G, 11, G, 13]
    for m in range(1, 13):
        idx = placement_indices(m, 12, "mix")
        assert len(set(idx)) == m and idx == sorted(idx) and all(0 <= i < 12 for i in idx)
        if m >= 2:
            assert idx[0] == 0 and idx[-1] == 11


def test_list_input():
    assert parse_windows([3, None, "-", 5], 4) == [3, G, G, 5]
    with pytest.raises(WindowSpecError, match="depth 5"):
        parse_windows([3, 5], 5)
    with pytest.raises(WindowSpecError, match="odd"):
        parse_windows([4, None], 2)


@pytest.mark.parametrize(
    "spec,depth,match",
    [
        ("4x2", 6, "odd"),
        ("3,4", 6, "odd"),
        ("0", 3, "odd"),
        ("local*", 4, "depth 4"),
        ("local@head", 5, "depth 5"),
        ("3x7", 6, "depth 6"),
        ("locl", 6, "unknown preset"),
        ("local@middle", 12, "unknown placement"),
        ("3,-,5@mix", 6, "without '-'"),
        ("3;5", 6, "cannot read"),
        ("3x", 6, "cannot read"),
        ("3x0", 6, ">= 1"),
        ("global@head", 6, "nothing to place"),
    ],
)
def test_bad_specs_quote_the_spec(spec, depth, match):
    with pytest.raises(WindowSpecError, match=match) as info:
        parse_windows(spec, depth)
    assert repr(spec) in str(info.value)
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize(
    "windows",
    [
        [G] * 4,
        [3, 5, 7, 9, 11, 13] + [G] * 6,
        [G] * 3 + [3, 3, 3, 5, 5, 5, 7, 7, 7],
        [3, G, 5, G, 7, G, G, 9, G, 11, G, 13],
        [5, 5, 5, G, 7],
        [G, 3, G, G, 5, G],
    ],
)
def test_format_roundtrip(windows):
    spec = format_windows(windows)
    assert parse_windows(spec, len(windows)) == windows


def test_format_prefers_presets():
    assert format_windows(parse_windows("local@mix", 12)) == "local@mix"
    assert format_windows(parse_windows("local*@tail", 12)) == "local*@tail"
    assert format_windows([3, 3, 5, G]) == "3x2,5"
    assert format_windows([G, G, 3, 5]) == "3,5@tail"
    assert format_windows([3, G, G, 5]) == "3,5@mix"
    assert format_windows([G, 3, G, 5, G]) == "-,3,-,5"
    assert PRESETS["local"] == [3, 5, 7, 9, 11, 13]

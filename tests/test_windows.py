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


# -------------------------------------------------------------------------------- windows that cover the whole grid


def test_covering_windows_definition():
    from ditscale.model import covering_windows

    # on a 4x4 grid a k x k window reaches (k-1)/2 tokens: k >= 7 sees every key from every query (the corner too)
    assert covering_windows([3, 5, 7, 9, G], (4, 4)) == [(2, 7), (3, 9)]
    assert covering_windows([5], (4, 4)) == []  # larger than the grid, but a corner query misses a row and a column
    assert covering_windows([13, 15, G], (8, 8)) == [(1, 15)]
    assert covering_windows([1, 3], (1, 1)) == [(0, 1), (1, 3)]
    assert covering_windows([7], (2, 4)) == [(0, 7)]


def test_a_window_covering_the_grid_warns_naming_block_and_grid():
    import warnings

    from ditscale.model import DiT_models, GlobalWindowWarning

    with pytest.warns(GlobalWindowWarning) as rec:  # DiT-T/2 at input 8: a 4x4 token grid
        model = DiT_models["DiT-T/2"](input_size=8, in_channels=1, num_classes=2, windows="3,7,-,9")
    assert len(rec) == 1
    msg = str(rec[0].message)
    for words in ("4x4 token grid", "block 1 (k=7)", "block 3 (k=9)", "global attention", "strict_windows"):
        assert words in msg, msg
    assert model.windows == [3, 7, G, 9]  # built as asked: it is a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DiT_models["DiT-T/2"](input_size=8, in_channels=1, num_classes=2, windows="3,5")  # k = 5 < 7: no warning
    with pytest.raises(WindowSpecError, match=r"block 1 \(k=7\).*4x4 token grid|4x4 token grid.*block 1 \(k=7\)"):
        DiT_models["DiT-T/2"](input_size=8, in_channels=1, num_classes=2, windows="3,7", strict_windows=True)


def test_strict_windows_config_key_reaches_the_model():
    from ditscale.config import load_config
    from ditscale.model import GlobalWindowWarning

    base = ["model.variant=DiT-T/2", "model.input_size=8", "model.in_channels=1", "model.num_classes=2"]
    with pytest.warns(GlobalWindowWarning, match="block 0"):
        load_config(None, [*base, "model.windows=7"]).model.build()
    with pytest.raises(WindowSpecError, match="block 0 \\(k=7\\)"):
        load_config(None, [*base, "model.windows=7", "model.strict_windows=true"]).model.build()


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model.windows=4", "window size 4 must be an odd integer"),  # YAML reads an int
        ("model.windows=-3", "cannot read '-3'"),
        ("model.windows=[3, 4]", "window size 4 must be an odd integer"),
        ("model.windows=local@middle", "unknown placement"),
        ("model.windows=3x", "cannot read"),
    ],
)
def test_unquoted_specs_on_the_command_line_get_the_parser_message(override, expected):
    from ditscale.config import load_config

    with pytest.raises(ConfigError, match=expected) as info:
        load_config(None, [override])
    assert "model.windows" in str(info.value)


def test_unquoted_valid_specs_become_spec_strings():
    from ditscale.config import load_config

    assert load_config(None, ["model.windows=5"]).model.windows == "5"
    assert load_config(None, ["model.windows=[3, 5, null]"]).model.windows == "3,5,-"
    assert load_config(None, ["model.windows=null"]).model.windows == "global"
    assert parse_windows(load_config(None, ["model.windows=3"]).model.windows, 4) == [3, G, G, G]


# -------------------------------------------------------------------------------- windows.py is the one owner
GRID = """
name: t
config:
  model: {{variant: {variant}, input_size: 8, in_channels: 1, num_classes: 10}}
  data: {{train: /nonexistent/manifest.json}}
  train: {{steps: 10, global_batch: 8, micro_batch: 4}}
axes:
  windows: {{key: model.windows, values: [{windows}]}}
"""


def test_a_new_placement_reaches_the_parser_the_grid_check_and_the_report(monkeypatch, tmp_path):
    from ditscale import grid
    from ditscale.errors import LaunchError
    from ditscale.eval import report
    from ditscale.model import windows

    # "edge": half the windowed blocks at the head, the rest at the tail; one entry in windows.PLACEMENTS
    monkeypatch.setitem(
        windows.PLACEMENTS, "edge", lambda m, depth: [*range((m + 1) // 2), *range(depth - m // 2, depth)]
    )
    assert parse_windows("3,5@edge", 4) == [3, G, G, 5]
    assert windows.placement_of("Local @ EDGE") == ("local", "edge")

    p = tmp_path / "g.yaml"
    p.write_text(GRID.format(variant="DiT-T/2", windows="global, 3x2@edge"))
    assert [r.config.model.windows for r in grid.expand(p)] == ["global", "3x2@edge"]
    p.write_text(GRID.format(variant="DiT-T/2", windows="local@edge"))  # 6 windowed blocks, depth 4
    with pytest.raises(LaunchError, match=r"run 't-local@edge': model.windows 'local@edge' on DiT-T/2: .* depth 4"):
        grid.expand(p)

    gap = {("DiT-T/1", "global", 10): [7.0], ("DiT-T/1", "local@head", 10): [5.0], ("DiT-T/1", "local@edge", 10): [4.0]}
    header, _rule, row = report.placement_table(gap, {}).splitlines()
    assert [c.strip() for c in header.strip("|").split("|")][-4:] == [
        "local@head",
        "local@mix",
        "local@tail",
        "local@edge",
    ]
    assert [c.strip() for c in row.strip("|").split("|")][-4:] == ["5.00", "", "", "4.00"]


@pytest.mark.parametrize("variant,spec", [("DiT-Q/3", "global"), ("DiT-T/2", "local@head"), ("DiT-T/2", "3x5")])
def test_variant_and_window_errors_say_the_same_at_every_entry_point(variant, spec, tmp_path):
    """create_model, the trainer's validate and the grid planner share one check, hence one message."""
    from ditscale import grid
    from ditscale.config import load_config
    from ditscale.errors import LaunchError
    from ditscale.model import create_model
    from ditscale.train.trainer import validate

    with pytest.raises(ConfigError) as built:
        create_model(variant, input_size=8, in_channels=1, num_classes=10, windows=spec)
    message = str(built.value)
    assert message.startswith("model.variant 'DiT-Q/3'" if variant == "DiT-Q/3" else f"model.windows {spec!r}")

    cfg = load_config(None, [f"model.variant={variant}", f"model.windows={spec}", "model.input_size=8"])
    with pytest.raises(ConfigError) as trained:
        validate(cfg, world_size=1)
    assert str(trained.value) == message

    p = tmp_path / "g.yaml"
    p.write_text(GRID.format(variant=variant, windows=spec))
    with pytest.raises(LaunchError) as planned:
        grid.expand(p)
    assert str(planned.value).split(": run 't-", 1)[1].split("': ", 1)[1] == message

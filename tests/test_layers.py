import pytest

from grains_edge.errors import GrainsError
from grains_edge.layers import parse_layers


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("all", [0, 1, 2, 3, 4, 5]), ("ALL ", [0, 1, 2, 3, 4, 5]), ("2-4", [2, 3, 4]), ("4,1,4", [1, 4]), ("3", [3])],
)
def test_specs(spec, expected):
    assert parse_layers(spec, 6) == expected


@pytest.mark.parametrize("spec", ["", "x", "4-2", "0-6", "6", "-1", "1,,x", "1-2-3"])
def test_bad_specs_name_the_fix(spec):
    with pytest.raises(GrainsError, match=r"bad layer selection .* fix: use 'all', a range like 3-12"):
        parse_layers(spec, 6)

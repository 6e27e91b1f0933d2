"""The one wording of an unknown name (mlaan.names): the closest allowed name is suggested, or none."""

import pytest

from mlaan.names import closest, unknown


@pytest.mark.parametrize("given, expected", [
    ("dgl_mlaan", "dgl+mlaan"),  # config files and bench folders spell it with "_"
    ("DGL+MLAN", "dgl+mlaan"),  # case is ignored
    ("FashionMNIST", "fashion-mnist"),
    ("zzz", None),  # nothing close: no guess
    (3, None),  # not a name at all
])
def test_closest_allowed_name(given, expected):
    assert closest(given, ["bp", "dgl", "dgl+mlaan", "fashion-mnist"]) == expected


def test_unknown_names_the_value_the_guess_and_the_allowed_ones():
    assert unknown("method", "dgl_mlaan", ["bp", "dgl+mlaan"]) == (
        "unknown method 'dgl_mlaan' (did you mean 'dgl+mlaan'?); available: bp, dgl+mlaan")
    assert unknown("aux_head", "big", ["mlp", "linear"], word="allowed") == (
        "unknown aux_head 'big'; allowed: mlp, linear")

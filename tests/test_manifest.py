"""The manifest loader: whatever manifest.json holds, a Manifest of the declared types or one GrainsError."""

import json
import typing

from hypothesis import given, settings
from hypothesis import strategies as st

from grains_edge.errors import GrainsError
from grains_edge.export.manifest import MANIFEST_NAME, Manifest, io_names

VALID = Manifest(
    source_model="default",
    architecture="llama",
    num_layers=2,
    hidden_size=8,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    vocab_size=10,
    max_context=16,
    steered_layers=[0, 1],
    input_names=io_names(2)[0],
    output_names=io_names(2)[1],
    opset=21,
    weights_fingerprint="0" * 16,
    versions={"onnxruntime": "1.0"},
    verification={"zero": 1e-6},
).to_dict()

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def load_from(tmp_path, text: bytes):
    (tmp_path / MANIFEST_NAME).write_bytes(text)
    return Manifest.load(tmp_path)


def check(tmp_path, text: bytes) -> None:
    """Either a GrainsError (one line, with the fix) or a manifest whose fields all have their declared types."""
    try:
        manifest = load_from(tmp_path, text)
    except GrainsError as error:
        assert "fix:" in str(error)
        return
    hints = typing.get_type_hints(Manifest)
    assert all(conforms(value, hints[name]) for name, value in manifest.to_dict().items())
    assert min(manifest.num_layers, manifest.hidden_size, manifest.vocab_size, manifest.head_dim) >= 1
    assert all(0 <= layer < manifest.num_layers for layer in manifest.steered_layers)


def conforms(value, hint) -> bool:
    """`value` has the type `hint` (from the dataclass's annotations, not the loader's own table)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(conforms(v, args[1]) for v in value.values())
    if hint is float:
        hint = (int, float)
    return isinstance(value, hint) and not isinstance(value, bool)


def test_a_valid_manifest_round_trips(tmp_path):
    assert load_from(tmp_path, json.dumps(VALID).encode()).to_dict() == VALID


@settings(max_examples=150, deadline=None)
@given(text=st.binary(max_size=200))
def test_random_bytes(tmp_path_factory, text):
    check(tmp_path_factory.mktemp("m"), text)


@settings(max_examples=150, deadline=None)
@given(value=JSON)
def test_random_json(tmp_path_factory, value):
    check(tmp_path_factory.mktemp("m"), json.dumps(value).encode())


@settings(max_examples=300, deadline=None)
@given(
    changes=st.dictionaries(st.sampled_from([*VALID, "extra"]), JSON, min_size=1, max_size=3),
    dropped=st.sets(st.sampled_from(list(VALID)), max_size=2),
)
def test_a_valid_manifest_with_fields_changed_or_dropped(tmp_path_factory, changes, dropped):
    data = {name: value for name, value in {**VALID, **changes}.items() if name not in dropped}
    check(tmp_path_factory.mktemp("m"), json.dumps(data).encode())

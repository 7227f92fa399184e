import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from grains_edge import paths
from grains_edge.errors import GrainsError
from grains_edge.steer import profiles
from grains_edge.steer.profiles import (
    Profile,
    check_fits,
    combine,
    list_profiles,
    load_profile,
    mixed,
    save_profile,
    steering_tensor,
    tuned_range,
)


def sample(name="calm", alpha=0.5, layers=(1, 2), **metadata) -> Profile:
    vectors = np.arange(4 * 8, dtype=np.float32).reshape(4, 8)
    return Profile(name, vectors, list(layers), alpha, "grains", {"source": "test.json", **metadata})


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees its own once-only warnings."""
    monkeypatch.setattr(profiles.warn_once, "shown", set())


def write(path, tensors: dict, metadata: dict) -> str:
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def test_round_trip_through_the_user_folder():
    save_profile(sample(), paths.profiles_dir() / "calm.safetensors")
    loaded = load_profile("calm")
    assert loaded.layers == [1, 2] and loaded.alpha == 0.5 and loaded.method == "grains"
    assert loaded.metadata["source"] == "test.json" and loaded.metadata["created"]
    np.testing.assert_array_equal(loaded.vectors, sample().vectors)
    assert [p.name for p in list_profiles() if not p.builtin] == ["calm"]


def test_steering_tensor_is_alpha_times_vectors_on_the_chosen_layers_only():
    profile = sample()
    steering = steering_tensor(profile, 2.0)
    np.testing.assert_array_equal(steering[[1, 2]], 2.0 * profile.vectors[[1, 2]])
    assert not steering[[0, 3]].any()
    np.testing.assert_array_equal(steering_tensor(profile), 0.5 * steering_tensor(profile, 1.0))
    np.testing.assert_array_equal(combine([(profile, None), (profile, None)]), 2 * steering_tensor(profile))


def test_a_mixed_profile_steers_like_the_sum_of_its_terms():
    first, second = sample("a", 0.5, (1, 2), fingerprint="f1"), sample("b", 0.25, (2, 3), fingerprint="f1")
    second.vectors = second.vectors[::-1].copy()
    mix = mixed("ab", [(first, 1.0), (second, -2.0)])
    expected = steering_tensor(first) + steering_tensor(second, -2.0 * 0.25)
    np.testing.assert_allclose(steering_tensor(mix), expected, rtol=1e-6)
    assert mix.layers == [1, 2, 3] and mix.alpha == 1.0 and mix.method == "mix"
    assert [term["profile"] for term in json.loads(mix.metadata["recipe"])] == ["a", "b"]
    assert mix.metadata["fingerprint"] == "f1"
    with pytest.raises(GrainsError, match="different weights"):
        mixed("x", [(first, 1.0), (sample("c", fingerprint="f2"), 1.0)])


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "p.safetensors"
    save_profile(sample(alpha=0.5), target)

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", broken)
    with pytest.raises(OSError):
        save_profile(sample(alpha=9.0), target)
    assert load_profile(str(target)).alpha == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_unknown_and_damaged_profiles_are_clear_errors(tmp_path):
    with pytest.raises(GrainsError, match="unknown profile 'nope'"):
        load_profile("nope")
    damaged = tmp_path / "bad.safetensors"
    damaged.write_bytes(b"not a profile")
    with pytest.raises(GrainsError, match="cannot read profile"):
        load_profile(str(damaged))


@pytest.mark.parametrize(
    ("tensors", "metadata", "problem"),
    [
        ({"vectors": np.full((4, 8), np.nan, np.float32)}, {"layers": "1"}, "NaN or infinite"),
        ({"vectors": np.full((4, 8), np.inf, np.float32)}, {"layers": "1"}, "NaN or infinite"),
        ({"vectors": np.ones((4, 8), np.float32)}, {"layers": "1,9"}, "names layers '1,9'"),
        ({"vectors": np.ones((4, 8), np.float32)}, {"layers": "-1"}, "names layers '-1'"),
        ({"vectors": np.ones((4, 8), np.float32)}, {"layers": "one"}, "names layers 'one'"),
        ({"vectors": np.ones((4, 8), np.float32)}, {"layers": "1", "alpha": "nan"}, "alpha 'nan'"),
        ({"vectors": np.ones((4, 8), np.float32)}, {"layers": "1", "alpha": "inf"}, "alpha 'inf'"),
        ({"vectors": np.ones((4, 8), np.float32)}, {"layers": "1", "alpha": "strong"}, "alpha 'strong'"),
        ({"vectors": np.ones((4, 8, 2), np.float32)}, {"layers": "1"}, r"shape \(4, 8, 2\)"),
        ({"vectors": np.ones((4, 8), np.int32)}, {"layers": "1"}, "int32"),
        ({"other": np.ones((4, 8), np.float32)}, {"layers": "1"}, "no 'vectors' tensor"),
    ],
)
def test_a_profile_that_cannot_steer_is_refused_on_load_in_one_line(tmp_path, tensors, metadata, problem):
    path = write(tmp_path / "p.safetensors", tensors, metadata)
    with pytest.raises(GrainsError, match=problem) as refused:
        load_profile(path)
    assert path in str(refused.value) and "fix:" in str(refused.value) and "\n" not in str(refused.value)


def test_a_non_finite_or_overflowing_strength_is_refused():
    for alpha in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(GrainsError, match="finite"):
            steering_tensor(sample(), alpha)
    with pytest.raises(GrainsError, match="overflows"):
        steering_tensor(sample(), 1e38)


def test_a_strength_far_outside_the_tuned_range_warns_once(capsys):
    tuning = json.dumps({"sweep": [{"alpha": 0.005}, {"alpha": 0.03}]})
    tuned = sample("tuned", 0.02, tuning=tuning)
    assert tuned_range(tuned) == (0.005, 0.03)
    assert tuned_range(sample("plain", 0.5)) == (0.0, 5.0)
    assert tuned_range(sample("garbled", 0.5, tuning="{not json")) == (0.0, 5.0)
    steering_tensor(tuned, 0.06)
    steering_tensor(tuned, -0.06)
    steering_tensor(tuned)
    assert capsys.readouterr().err == ""
    steering_tensor(tuned, 1e6)
    steering_tensor(tuned, 2e6)
    warned = capsys.readouterr().err.strip().splitlines()
    assert len(warned) == 1 and "far outside" in warned[0] and "[0.005, 0.03]" in warned[0]
    steering_tensor(sample("plain", 0.5), 9.0)
    assert capsys.readouterr().err == ""
    steering_tensor(sample("plain", 0.5), 11.0)
    assert "far outside" in capsys.readouterr().err


def test_check_fits_refuses_other_shapes_and_warns_once_on_other_weights():
    warnings = []

    def warn(key, message):
        warnings.append(message)

    profile = sample(fingerprint="aaaa")
    with pytest.raises(GrainsError, match="another model"):
        check_fits(profile, 5, 8, warn=warn)
    with pytest.raises(GrainsError, match=r"layers \[7\]"):
        check_fits(sample(layers=(1, 7)), 4, 8, warn=warn)
    assert check_fits(profile, 4, 8, "aaaa", warn=warn) is profile and not warnings
    check_fits(profile, 4, 8, None, warn=warn)
    check_fits(sample(), 4, 8, "bbbb", warn=warn)  # no fingerprint recorded: nothing to compare
    assert not warnings
    check_fits(profile, 4, 8, "bbbb", warn=warn)
    assert len(warnings) == 1 and "aaaa" in warnings[0] and "bbbb" in warnings[0]


def test_steering_for_applies_the_one_rule_and_checks_the_model():
    from types import SimpleNamespace

    save_profile(sample(fingerprint="aaaa"), paths.profiles_dir() / "calm.safetensors")
    engine = SimpleNamespace(num_layers=4, hidden_size=8, manifest=SimpleNamespace(weights_fingerprint="aaaa"))
    steering, info = profiles.steering_for(engine, "calm", 2.0, None)
    np.testing.assert_array_equal(steering, steering_tensor(load_profile("calm"), 2.0))
    assert info == {"profile": "calm", "method": "grains", "alpha": 2.0, "layers": [1, 2]}
    assert profiles.steering_for(engine, "none") == (None, {"profile": "none"})
    steering, info = profiles.steering_for(engine, "calm", None, "3")
    assert info["layers"] == [3] and steering[3].any() and not steering[:3].any()
    with pytest.raises(GrainsError, match="another model"):
        profiles.steering_for(SimpleNamespace(num_layers=4, hidden_size=16), "calm")


FLOAT_DTYPES = [np.float16, np.float32, np.float64]
ANY_DTYPES = [*FLOAT_DTYPES, np.int8, np.int32, np.uint8, np.bool_]
metadata_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0", "-1", "1,2", "3-5", ",", "1,,2", "99", "0.02", "{}"]),
)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(ANY_DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    size = int(np.prod(shape)) if shape else 1
    special = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e30, -1.5])
    values = draw(st.lists(st.one_of(st.floats(-1e3, 1e3), special), min_size=size, max_size=size))
    with np.errstate(all="ignore"):
        array = np.array(values, dtype=np.float64).reshape(shape)
        return np.asarray(np.nan_to_num(array) if dtype not in FLOAT_DTYPES else array).astype(dtype)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    names=st.lists(st.sampled_from(["vectors", "other"]), min_size=0, max_size=2, unique=True),
    data=st.data(),
    metadata=st.dictionaries(st.sampled_from(["layers", "alpha", "name", "tuning", "method"]), metadata_text),
)
def test_any_safetensors_file_loads_as_a_valid_profile_or_a_grains_error(tmp_path, names, data, metadata):
    path = tmp_path / "random.safetensors"
    write(path, {name: data.draw(tensors()) for name in names}, metadata)
    try:
        profile = load_profile(str(path))
    except GrainsError as error:
        assert "\n" not in str(error) and "fix:" in str(error)
        return
    assert profile.vectors.ndim == 2 and np.isfinite(profile.vectors).all() and np.isfinite(profile.alpha)
    assert all(0 <= layer < profile.vectors.shape[0] for layer in profile.layers) and profile.layers
    assert np.isfinite(steering_tensor(profile)).all()
    tuned_range(profile)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda n, rest: n + rest,
            st.sampled_from(
                [
                    (8).to_bytes(8, "little") + b'{"a":1}',
                    (40).to_bytes(8, "little") + b'{"vectors":{"dtype":"F32","shape":[1,1],',
                    (2**63).to_bytes(8, "little"),
                    (60).to_bytes(8, "little") + b'{"vectors":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}',
                ]
            ),
            st.binary(max_size=80),
        ),
    )
)
def test_random_bytes_as_a_profile_are_a_grains_error(tmp_path, content):
    path = tmp_path / "random.safetensors"
    path.write_bytes(content)
    with pytest.raises(GrainsError):
        load_profile(str(path))

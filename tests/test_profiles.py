import numpy as np
import pytest

from grains_edge import paths
from grains_edge.errors import GrainsError
from grains_edge.profiles import Profile, list_profiles, load_profile, mix, save_profile, steering_tensor


def sample(name="calm", alpha=0.5) -> Profile:
    vectors = np.arange(4 * 8, dtype=np.float32).reshape(4, 8)
    return Profile(name, vectors, [1, 2], alpha, "grains", {"source": "test.json"})


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
    np.testing.assert_array_equal(mix([(profile, 1.0), (profile, 1.0)]), 2 * steering_tensor(profile))


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

"""A request's `steering` field -> the steering tensor of its row, through the profiles module's one rule.

    {"profile": "truthful"}                      the profile at its own α
    {"profile": "truthful", "alpha": 0.02}       at α 0.02
    {"mix": [{"profile": "truthful", "weight": 1}, {"profile": "no-sycophancy", "weight": 0.5}]}
                                                 the sum, each at α = weight · its own α (profiles.combine)
    {"profile": "none"}                          unsteered

Over HTTP a profile is named, never a path: a request cannot make the server open an arbitrary file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from grains_edge.errors import GrainsError
from grains_edge.steer.profiles import Profile, check_fits, combine, load_profile, weighted_terms

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
NONE = "none"


class SteeringError(ValueError):
    """A request's steering cannot be applied; the message names the problem and the fix."""


@dataclass(frozen=True)
class AppliedSteering:
    """What a row is steered with: `applied` goes back to the client, `tensor` [layers, hidden] to the batch."""

    applied: dict
    tensor: np.ndarray | None  # None: unsteered


UNSTEERED = AppliedSteering({"profile": NONE}, None)


def is_finite_number(value: object) -> bool:
    """A JSON number that is finite (JSON's true and false arrive as Python bools, which are ints)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def finite_number(value, what: str) -> float:
    if not is_finite_number(value):
        raise SteeringError(f"{what} must be a finite number, got {value!r}; fix: pass e.g. 0.02")
    return float(value)


class SteeringResolver:
    """Resolves steering specs for one model ([layers, hidden]) with profiles loaded from disk per request,
    so a profile built while the server runs is usable at once."""

    def __init__(self, shape: tuple[int, int], fingerprint: str | None = None, default: AppliedSteering = UNSTEERED):
        self.shape = shape  # [num_layers, hidden] of the served model
        self.fingerprint = fingerprint  # of its weights: a profile built from others steers with a warning
        self.default = default

    def profile(self, name, local: bool = False) -> Profile:
        """A profile by name; `local` (the server's own command line) may also name a file."""
        if not local and (not isinstance(name, str) or not NAME.fullmatch(name) or name.endswith(".safetensors")):
            raise SteeringError(
                f"profile must be a profile name, got {name!r}; fix: pick one from /v1/steering/profiles"
            )
        try:
            return check_fits(load_profile(name), *self.shape, self.fingerprint)
        except GrainsError as error:
            raise SteeringError(str(error)) from None

    def resolve(self, spec) -> AppliedSteering:
        """The steering of a request body's `steering` value (None: the server's default)."""
        if spec is None:
            return self.default
        if isinstance(spec, str):
            spec = {"profile": spec}
        if not isinstance(spec, dict):
            raise SteeringError(
                'steering must be an object; fix: {"profile": "truthful", "alpha": 0.02} or {"mix": [...]}'
            )
        unknown = set(spec) - {"profile", "alpha", "mix"}
        if unknown or ("mix" in spec) == ("profile" in spec) or ("mix" in spec and "alpha" in spec):
            raise SteeringError(
                'steering takes either "profile" (with an optional "alpha") or "mix"; '
                'fix: {"profile": "truthful", "alpha": 0.02} or {"mix": [{"profile": "truthful", "weight": 1}]}'
            )
        if "profile" in spec:
            if spec["profile"] == NONE and spec.get("alpha") is None:
                return UNSTEERED
            profile = self.profile(spec["profile"])
            alpha = profile.alpha if spec.get("alpha") is None else finite_number(spec["alpha"], "steering.alpha")
            return self.checked({"profile": profile.name, "alpha": alpha}, [(profile, alpha)])
        weighted = []
        mix = spec["mix"]
        if not isinstance(mix, list) or not mix or not all(isinstance(t, dict) for t in mix):
            raise SteeringError('steering.mix must be a non-empty list; fix: [{"profile": "truthful", "weight": 1}]')
        for term in mix:
            if set(term) - {"profile", "weight"} or "profile" not in term:
                raise SteeringError('each steering.mix entry is {"profile": NAME, "weight": W}; fix: drop other keys')
            weighted.append(
                (self.profile(term["profile"]), finite_number(term.get("weight", 1.0), "steering.mix weight"))
            )
        terms = weighted_terms(weighted)
        applied = [
            {"profile": profile.name, "weight": weight, "alpha": alpha}
            for (profile, weight), (_, alpha) in zip(weighted, terms, strict=True)
        ]
        return self.checked({"mix": applied}, terms)

    def server_default(self, name_or_path: str | None, alpha: float | None = None) -> AppliedSteering:
        """The steering of `--profile` (a name or a file) at `alpha`, its own by default; None: unsteered."""
        if name_or_path in (None, NONE):
            return UNSTEERED
        profile = self.profile(name_or_path, local=True)
        strength = profile.alpha if alpha is None else finite_number(alpha, "--alpha")
        return self.checked({"profile": profile.name, "alpha": strength}, [(profile, strength)])

    def checked(self, applied: dict, terms: list[tuple[Profile, float]]) -> AppliedSteering:
        try:
            return AppliedSteering(applied, combine(terms))  # [layers, hidden], finite: combine refuses overflow
        except GrainsError as error:
            raise SteeringError(str(error)) from None

"""What steers the next reply: a profile (or none) at a strength α, optionally mixed with a second one."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from grains_edge.steer.profiles import Profile, check_fits, combine, list_profiles, load_profile, warn_once

ALPHA_STEP = 0.05  # for a profile without a default strength
ALPHA_LIMIT = 3.0


def alpha_step(default_alpha: float) -> float:
    """One key press: about a tenth of the profile's default α, rounded down to 1, 2 or 5 x 10^k."""
    tenth = abs(default_alpha) / 10
    if tenth == 0:
        return ALPHA_STEP
    power = 10.0 ** math.floor(math.log10(tenth))
    return max(m * power for m in (1, 2, 5) if m * power <= tenth * (1 + 1e-9))


def format_alpha(alpha: float, signed: bool = False) -> str:
    """0.60, 1.25, and three significant digits for small strengths (0.0125); signed: +0.60."""
    sign = "+" if signed else ""
    return f"{alpha:{sign}.2f}" if alpha == 0 or abs(alpha) >= 0.1 else f"{alpha:{sign}.3g}"


@dataclass(frozen=True)
class Steering:
    profile: str | None = None  # None: the unsteered model
    alpha: float = 0.0
    mix: str | None = None  # a second profile added on top
    mix_alpha: float = 0.0

    @property
    def label(self) -> str:
        if self.profile is None:
            return "none"
        text = f"{self.profile} α{format_alpha(self.alpha)}"
        return text if self.mix is None else f"{text} + {self.mix} α{format_alpha(self.mix_alpha)}"

    def stepped(self, steps: int, step: float = ALPHA_STEP) -> Steering:
        """α moved by `steps` increments of `step`, clamped to ±ALPHA_LIMIT."""
        alpha = round(self.alpha + steps * step, 6)
        return replace(self, alpha=max(-ALPHA_LIMIT, min(ALPHA_LIMIT, alpha)))

    def to_record(self) -> tuple[str, float | None]:
        """(profile, alpha) columns of a stored message."""
        if self.profile is None:
            return "none", None
        if self.mix is None:
            return self.profile, self.alpha
        return f"{self.profile}+{self.mix}@{self.mix_alpha:g}", self.alpha

    @classmethod
    def from_record(cls, profile: str | None, alpha: float | None) -> Steering:
        if not profile or profile == "none":
            return cls()
        first, plus, rest = profile.partition("+")
        mix, _, mix_alpha = rest.rpartition("@")
        if plus and mix:
            return cls(first, alpha or 0.0, mix, float(mix_alpha))
        return cls(profile, alpha or 0.0)


class ProfileLibrary:
    """The profiles on offer, loaded once each, and the steering tensor of a choice."""

    def __init__(
        self,
        shape: tuple[int, int],
        source: Callable[[], list[Profile]] = list_profiles,
        loader: Callable[[str], Profile] = load_profile,
        fingerprint: str | None = None,
        warn: Callable[[str, str], None] = warn_once,
    ):
        self.shape = shape  # [num_layers, hidden] of the loaded model
        self.source = source
        self.loader = loader
        self.fingerprint = fingerprint  # of the loaded model's weights: a profile built from others warns once
        self.warn = warn  # where a profile's warnings go: stderr until the chat shows them itself
        self.profiles: dict[str, Profile] = {}

    def refresh(self) -> list[Profile]:
        self.profiles |= {profile.name: profile for profile in self.source()}
        return sorted(self.profiles.values(), key=lambda profile: profile.name)

    def fits(self, profile: Profile) -> bool:
        return tuple(profile.vectors.shape) == self.shape

    def get(self, name: str) -> Profile:
        """A listed profile by name, else one loaded by name or path (then listed too)."""
        profile = check_fits(self.profiles.get(name) or self.loader(name), *self.shape, self.fingerprint, self.warn)
        self.profiles[profile.name] = profile
        return profile

    def tensor(self, steering: Steering) -> np.ndarray | None:
        """[num_layers, hidden] for the engine (profiles.combine, the one strength rule); None: unsteered."""
        if steering.profile is None:
            return None
        terms = [(self.get(steering.profile), steering.alpha)]
        if steering.mix is not None:
            terms.append((self.get(steering.mix), steering.mix_alpha))
        return combine(terms, self.warn)

    def chosen(self, name: str | None, alpha: float | None = None) -> Steering:
        """The steering of picking profile `name` (None: unsteered) at `alpha`, by default its own."""
        if name is None or name == "none":
            return Steering()
        profile = self.get(name)
        return Steering(profile.name, profile.alpha if alpha is None else alpha)

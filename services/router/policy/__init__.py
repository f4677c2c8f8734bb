"""The routing policy: filters -> weighted scorers -> picker, one Profile per role (base.py).

Importing the package registers the built-in plugins (filters, scorers, pick)."""

from services.router.policy import filters, pick, scorers  # noqa: F401  (registers the plugins)
from services.router.policy.base import (
    Candidate,
    Filter,
    Picker,
    PrefixHit,
    Profile,
    Ranking,
    RouteRequest,
    Scorer,
)
from services.router.policy.config import LengthBucket, PolicyConfig, ProfileSpec, TierCredit

__all__ = [
    "Candidate",
    "Filter",
    "LengthBucket",
    "Picker",
    "PolicyConfig",
    "PrefixHit",
    "Profile",
    "ProfileSpec",
    "Ranking",
    "RouteRequest",
    "Scorer",
    "TierCredit",
]

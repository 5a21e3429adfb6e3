"""Who is held out and who gets which A/B arm: a pure function of the contact, the ruleset and its salt.

A hash instead of a random draw, so the live service, a simulation and a backtest put every contact in
the same group without sharing any state, and a contact keeps its group across restarts. Raising a
holdout from 5 % to 10 % keeps the first 5 % held out (the threshold only moves up). The arm is kept in
the contact's state once given (`state["arms"]`), so changing weights later moves nobody already in a
test; only new contacts follow the new weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from rulesvc.core.funnel import group_label
from rulesvc.core.ruleformat import HOLDOUT_GROUP, RulesetFile, Variant, arms


def unit(salt: str, contact_id: str, purpose: str) -> float:
    """A uniform number in [0, 1) for this contact: the first 8 bytes of a SHA-256, as a fraction."""
    digest = hashlib.sha256(f"{salt}\x00{contact_id}\x00{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def share(text: str) -> float:
    """`5%` as 0.05 (exactly: `0.35%` is not 0.0034999...)."""
    return float(Decimal(text.removesuffix("%")) / 100)


@dataclass(frozen=True)
class Groups:
    """A ruleset's holdout and arms, read once when it is compiled: the engine asks for a contact's
    group at every send and entry, so nothing here is parsed or searched again per event."""

    name: str
    salt: str
    holdout: float | None
    arms: tuple[Variant, ...]

    @classmethod
    def of(cls, name: str, source: RulesetFile) -> Groups:
        holdout = share(source.holdout) if source.holdout is not None else None
        return cls(name, source.salt or name, holdout, tuple(arms(source)))

    def held_out(self, contact_id: str) -> bool:
        return self.holdout is not None and unit(self.salt, contact_id, "holdout") < self.holdout

    def arm_of(self, contact_id: str, state: dict[str, Any]) -> str | None:
        """The contact's arm: the one kept in its state if the ruleset still has it, else drawn by weight
        (and kept, as the state is saved with the decision)."""
        if not self.arms:
            return None
        kept = state.get("arms", {}).get(self.name)
        if isinstance(kept, str) and any(v.name == kept for v in self.arms):
            return kept
        chosen = pick_arm(self.arms, unit(self.salt, contact_id, "variant")).name
        state.setdefault("arms", {})[self.name] = chosen
        return chosen

    def group_of(self, contact_id: str, state: dict[str, Any]) -> str:
        """`holdout`, the arm's name, or "" (a ruleset without variants): what every count is split by."""
        if self.held_out(contact_id):
            return HOLDOUT_GROUP
        return self.arm_of(contact_id, state) or ""


def pick_arm(variants: Sequence[Variant], u: float) -> Variant:
    total = sum(v.weight for v in variants)
    point = u * total
    for variant in variants:
        if point < variant.weight:
            return variant
        point -= variant.weight
    return variants[-1]  # u * total rounded up to total


def message_group(message: Mapping[str, Any]) -> str | None:
    """A message's group as reports show it: `holdout`, its arm, or None (no test in its ruleset)."""
    variant = message.get("variant")
    return group_label(variant if isinstance(variant, str) else None, bool(message.get("held_out"))) or None

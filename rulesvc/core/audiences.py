"""How ad platforms match a person: identifiers normalised as each platform documents, then SHA-256.

Shared by the ads plugin (which hashes a stored contact's email and phone at sync time) and by erasure
(which must queue a contact's removal from its audiences before the profile is gone, so it keeps only
these digests, never a plain identifier)."""

from __future__ import annotations

import hashlib
import re
from typing import Literal

Platform = Literal["generic", "meta", "google"]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def normalise_email(email: str) -> str:
    return email.strip().lower()


def normalise_phone(phone: str, platform: Platform = "generic") -> str | None:
    """E.164 (`+4915112345678`), or for Meta its digits alone (`4915112345678`: "remove symbols, letters
    and any leading zeros", country code included); None without a country code, which no platform
    can match."""
    digits = re.sub(r"[^\d+]", "", phone.strip())
    if digits.startswith("00"):
        digits = "+" + digits[2:]
    if not re.fullmatch(r"\+[1-9]\d{6,14}", digits):
        return None
    return digits[1:] if platform == "meta" else digits


def hashed_identifiers(email: str | None, phone: str | None, email_invalid: bool = False) -> dict[str, str]:
    """Every digest any platform could need for this person, keyed by what it is: `email_sha256`,
    `phone_e164_sha256` (generic, Google), `phone_digits_sha256` (Meta). Empty when nothing matches."""
    out: dict[str, str] = {}
    if email and not email_invalid:
        out["email_sha256"] = sha256(normalise_email(email))
    if phone and (e164 := normalise_phone(phone)):
        out["phone_e164_sha256"] = sha256(e164)
        out["phone_digits_sha256"] = sha256(e164[1:])
    return out


def member_for(identifiers: dict[str, str], platform: Platform) -> dict[str, str] | None:
    """The member a platform is sent (`email_sha256`, `phone_sha256`) from `hashed_identifiers`' digests."""
    out: dict[str, str] = {}
    if "email_sha256" in identifiers:
        out["email_sha256"] = identifiers["email_sha256"]
    phone_key = "phone_digits_sha256" if platform == "meta" else "phone_e164_sha256"
    if phone_key in identifiers:
        out["phone_sha256"] = identifiers[phone_key]
    return out or None

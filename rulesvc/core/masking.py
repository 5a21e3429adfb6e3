"""Credentials out of text shown to people: what a channel or plugin says of itself (`detail`) and what a
provider answered may hold a URL with a password in it (`https://user:pass@host/`) or a token in its query
(`?token=...`) or in its path (Slack's and Discord's webhook URLs are the credential:
`/services/T0/B0/XXXX`, `/api/webhooks/ID/TOKEN`). The settings' own secrets are never echoed
(rulesvc.channels.is_secret); this catches them where they hide inside another value."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s?#]+@")
_SECRET_PARAM = re.compile(
    r"(?i)([?&;][^=&;\s#]*(?:token|secret|key|password|passwd|pwd|sig|signature|auth)[^=&;\s#]*=)[^&;\s#]+"
)

# A URL's path past its first segment: where the webhook URLs of chat tools keep their secret.
_DEEP_PATH = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s?#]+/[^/\s?#]+)/[^\s?#]+")


def mask_credentials(text: str) -> str:
    """`https://***@host/x/***?token=***`: the place stays readable, the credential does not."""
    text = _USERINFO.sub(r"\1***@", text)
    return _SECRET_PARAM.sub(r"\1***", _DEEP_PATH.sub(r"\1/***", text))

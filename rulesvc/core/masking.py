"""Credentials out of text shown to people: what a channel or plugin says of itself (`detail`) and what a
provider answered may hold a URL with a password in it (`https://user:pass@host/`) or a token in its query
(`?token=...`). The settings' own secrets are never echoed (rulesvc.channels.is_secret); this catches
them where they hide inside another value."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s?#]+@")
_SECRET_PARAM = re.compile(
    r"(?i)([?&;][^=&;\s#]*(?:token|secret|key|password|passwd|pwd|sig|signature|auth)[^=&;\s#]*=)[^&;\s#]+"
)


def mask_credentials(text: str) -> str:
    """`https://***@host/x?token=***`: the place stays readable, the credential does not."""
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1***@", text))

"""The `push` channel: Firebase Cloud Messaging HTTP v1, authenticated with a service account.

Settings ([channels.push] or RULESVC_CHANNEL_PUSH_*): see `PushSettings`. The access token comes from
the key's `token_uri` with a signed JWT (RS256, OAuth2 JWT bearer grant) and is renewed before it expires
or when FCM answers 401. Only a token FCM calls UNREGISTERED (the `errorCode` in the error's details) is
removed from the contact; any other 404 or 400 fails the send and keeps it. A template's `.url` goes as FCM
documents it: `webpush.fcm_options.link` for browsers (an https URL only; FCM refuses others) and `data.url`
for the apps, whose code opens it (Android's `click_action` names an intent, not a URL).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from msgspec import Meta

from rulesvc import hookimpl
from rulesvc.channels import (
    Channel,
    ChannelSettings,
    Delivery,
    HttpChannel,
    OutboundMessage,
    read_settings,
    retry_after,
)

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_jwt(account: dict[str, Any], now: float) -> str:
    header = {"alg": "RS256", "typ": "JWT", "kid": account.get("private_key_id", "")}
    claims = {"iss": account["client_email"], "scope": SCOPE, "aud": account["token_uri"],
              "iat": int(now), "exp": int(now) + 3600}  # fmt: skip
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}".encode()
    key = serialization.load_pem_private_key(account["private_key"].encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode()}.{b64url(signature)}"


class PushSettings(ChannelSettings):
    """Firebase Cloud Messaging HTTP v1, authenticated with a service account's key."""

    required: ClassVar[tuple[str | tuple[str, ...], ...]] = (
        ("service_account_file", "service_account_json"),
    )

    service_account_file: Annotated[
        str, Meta(description="the service account's JSON key file Google gives")
    ] = ""
    service_account_json: Annotated[
        str, Meta(description="the same JSON key as text, instead of the file", extra={"secret": True})
    ] = ""
    base_url: Annotated[str, Meta(description="the FCM API's base URL")] = "https://fcm.googleapis.com"
    timeout: Annotated[float, Meta(gt=0, description="seconds a send may take")] = 10.0


class PushChannel(HttpChannel):
    name = "push"
    deduplicates = False  # FCM v1 has no idempotency key
    settings_type = PushSettings

    def __init__(self, config: Mapping[str, Any] | PushSettings) -> None:
        settings = read_settings("push", config, PushSettings, type(self))
        self.problem: str | None = None
        self.account: dict[str, Any] = {}
        try:
            if settings.service_account_json:
                self.account = json.loads(settings.service_account_json)
            elif settings.service_account_file:
                with open(settings.service_account_file, encoding="utf-8") as fh:
                    self.account = json.load(fh)
            else:
                self.problem = "missing setting: service_account_file or service_account_json"
        except (OSError, ValueError) as exc:
            which = "service_account_json" if settings.service_account_json else "service_account_file"
            self.problem = f"cannot read the service account key (channels.push.{which}): {exc}"
        missing = [
            k for k in ("project_id", "client_email", "private_key", "token_uri") if k not in self.account
        ]
        if not self.problem and missing:
            self.problem = f"service account key lacks: {', '.join(missing)}"
        self.base_url = settings.base_url.rstrip("/")
        self.timeout = settings.timeout
        self._token: str | None = None
        self._token_expires = 0.0

    def status(self) -> tuple[bool, str]:
        if self.problem:
            return False, self.problem
        return True, f"FCM v1, project {self.account['project_id']}"

    def reachable(self, contact: dict[str, Any]) -> str | None:
        return None if contact.get("push_tokens") else "no push token"

    async def access_token(self, renew: bool = False) -> str:
        if self._token and not renew and time.time() < self._token_expires - 60:
            return self._token
        http = await self.http()
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": signed_jwt(self.account, time.time())}  # fmt: skip
        async with http.post(self.account["token_uri"], data=form) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                raise PermissionError(f"token endpoint said HTTP {resp.status}: {body}")
        self._token = str(body["access_token"])
        self._token_expires = time.time() + float(body.get("expires_in", 3600))
        return self._token

    async def send(self, message: OutboundMessage) -> Delivery:
        title, body = message.content.get("title"), message.content.get("body")
        if not (title or body):
            return Delivery("failed", "a push template needs a .title or .body part")
        try:
            token = await self.access_token()
        except PermissionError as exc:
            return Delivery("retry", str(exc))
        sent: list[str] = []
        dead: list[tuple[str, Any]] = []
        problems: list[str] = []
        for device in message.contact.get("push_tokens", []):
            result = await self._send_one(device, message, title, body, token)
            if result == "renew":
                token = await self.access_token(renew=True)
                result = await self._send_one(device, message, title, body, token)
            if isinstance(result, Delivery):
                if result.status == "retry":
                    return result
                problems.append(result.reason or "failed")
            elif result == "unregistered":
                dead.append(("push_tokens", device))
            else:
                sent.append(str(result))
        if sent:
            return Delivery("sent", provider_id=sent[0], unreachable=dead)
        return Delivery("failed", "; ".join(problems) or "every push token is unregistered", unreachable=dead)

    async def _send_one(
        self, device: str, message: OutboundMessage, title: str | None, body: str | None, token: str
    ) -> str | Delivery:
        http = await self.http()
        notification = {k: v for k, v in (("title", title), ("body", body)) if v}
        data = {"message_id": message.message_id} | {
            k: v if isinstance(v, str) else json.dumps(v) for k, v in message.params.items() if v is not None
        }
        fcm: dict[str, Any] = {"token": device, "notification": notification, "data": data}
        link = message.content.get("url")
        if link:
            data["url"] = link
            if link.startswith("https://"):
                fcm["webpush"] = {"fcm_options": {"link": link}}
        payload = {"message": fcm}
        url = f"{self.base_url}/v1/projects/{self.account['project_id']}/messages:send"
        async with http.post(url, json=payload, headers={"Authorization": f"Bearer {token}"}) as resp:
            try:
                answer = await resp.json(content_type=None) if resp.content_length != 0 else {}
            except ValueError:  # a proxy's or a load balancer's page, not FCM's JSON
                answer = {}
            if resp.status == 200:
                return str(answer.get("name", ""))
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            codes = {d.get("errorCode") for d in error.get("details", []) if isinstance(d, dict)}
            if resp.status == 401:
                return "renew"
            if "UNREGISTERED" in codes:  # the app was uninstalled or the token expired: never valid again
                return "unregistered"
            said = f"{error.get('status', '')} {error.get('message', '')}".strip() if error else resp.reason
            detail = f"HTTP {resp.status}: {said}"
            if resp.status == 429 or resp.status >= 500:
                return Delivery("retry", detail, retry_after=retry_after(resp.headers))
            return Delivery("failed", detail)


@hookimpl
def register_channels(register: Callable[[Channel], None], config: Callable[[str], dict[str, Any]]) -> None:
    """The FCM push channel, configured from [channels.push]."""
    register(PushChannel(config("push")))

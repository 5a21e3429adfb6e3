"""The channels (`/console/channels`): each one's configuration state (as `GET /v1/channels` says it,
secrets masked), its last send and error rate over 24 h, and a test send (`POST /v1/channels/{name}/test`,
the same operation) for admin sessions."""

from __future__ import annotations

import msgspec
from aiohttp import web

from rulesvc.web.console.base import ConsoleRoute, console_url, error_page, form_of, render, see_other
from rulesvc.web.overview_schemas import ChannelTestFailed, ChannelTestRequest, ChannelTestResult
from rulesvc.web.schemas import ErrorBody, NoQuery
from rulesvc.web.views.base import QueryRejected, parse_query
from rulesvc.web.views.channels import channel_test_send, channels_of

# What a test needs typed in, per channel: (the field's label, an example). Others need nothing.
ADDRESS_FIELDS = {
    "email": ("Email address", "you@example.com"),
    "sms": ("Phone number (E.164)", "+4915112345678"),
    "push": ("Device push token", "the token your app registered"),
    "webpush": ("Browser subscription (JSON)", '{"endpoint": "https://...", "keys": {...}}'),
}


async def channels_page(
    request: web.Request, status: int = 200, error: str | None = None, failed_channel: str | None = None
) -> web.Response:
    listing = await channels_of(request.app)
    return render(
        request,
        "channels.html",
        status=status,
        nav="channels",
        channels=listing.channels,
        plugins=listing.plugins,
        address_fields=ADDRESS_FIELDS,
        error=error,
        failed_channel=failed_channel,
        typed=form_of(request) if request.method == "POST" else {},
    )


async def channels_get(request: web.Request) -> web.StreamResponse:
    try:  # as its API route, it takes no query parameters: a typo is said, not ignored
        parse_query(request, NoQuery)
    except QueryRejected as exc:
        return error_page(request, 422, exc.message)
    return await channels_page(request)


def _request_of(name: str, form: dict[str, str]) -> ChannelTestRequest | str:
    """The form as the API's body, or why it is not one (the API's own words)."""
    body: dict[str, object] = {}
    to = form.get("to", "").strip()
    if name == "webpush":
        if to:
            try:
                body["webpush_subscription"] = msgspec.json.decode(to)
            except (msgspec.DecodeError, RecursionError) as exc:
                return f"the subscription is not JSON: {exc or 'nested too deeply'}"
    elif to:
        body["to"] = to
    try:
        return msgspec.convert(body, ChannelTestRequest)
    except msgspec.ValidationError as exc:
        return str(exc)


async def post_test_send(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    form = {k: v for k, v in form_of(request).items() if k != "csrf_token"}
    body = _request_of(name, form)
    if isinstance(body, str):
        return await channels_page(request, 422, body, name)
    status, answer = await channel_test_send(request.app, name, body)
    if isinstance(answer, ChannelTestResult):
        said = f" The provider said: {answer.detail}." if answer.detail else ""
        ref = f" The provider's message id: {answer.provider_id}." if answer.provider_id else ""
        where = f" to {body.to}" if body.to else ""
        notice = f"Test message sent through {name}{where} in {answer.seconds:.2f} s.{said}{ref}"
        return await see_other(request, console_url("/channels") + f"#channel-{name}", notice)
    if status == 404:
        return error_page(request, 404, answer.error if isinstance(answer, ErrorBody) else "no such channel")
    message = answer.error if isinstance(answer, ErrorBody | ChannelTestFailed) else str(answer)
    # The provider's failure (the API's 502) is the answer to the test, and the page that says so worked:
    # 200 with the provider's words in the error box. A refusal of the input keeps the API's status.
    return await channels_page(request, 200 if status >= 500 else status, message, name)


ROUTES = [
    ConsoleRoute("GET", "/channels", channels_get, title="Channels"),
    ConsoleRoute("POST", "/channels/{name}/test", post_test_send, change=True, title="Test send"),
]

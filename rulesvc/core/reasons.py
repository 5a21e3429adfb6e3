"""The reason codes of a message's fate: short, stable, few, so a dashboard can group by them and an API
user can filter on them; the human detail (which channel, what the provider said) goes beside them.

Every message that is not simply sent gets one of these as its `reason`, in the live service and in a
simulation alike (both decide through `core.sendpolicy`, `core.engine` and these codes).
"""

from __future__ import annotations

from typing import Final

# The send rules (core/sendpolicy.py): the message is suppressed, or postponed.
CHANNEL_NOT_INSTALLED: Final = "channel_not_installed"
CHANNEL_NOT_CONFIGURED: Final = "channel_not_configured"
CHANNEL_ERROR: Final = "channel_error"
SUPPRESSION_LIST: Final = "suppression_list"
NO_CONSENT: Final = "no_consent"
UNREACHABLE: Final = "unreachable"
GUARD_FAILED: Final = "guard_failed"
QUIET_HOURS: Final = "quiet_hours"
FREQUENCY_CAP: Final = "frequency_cap"
HELD_OUT: Final = "held_out"
# The delivery (runtime/dispatcher.py): failed, retried, dead, uncertain.
TEMPLATE_ERROR: Final = "template_error"
PROVIDER_REJECTED: Final = "provider_rejected"
PROVIDER_ERROR: Final = "provider_error"
TIMEOUT: Final = "timeout"
INTERRUPTED: Final = "interrupted"
DELIVERY_FAILED: Final = "delivery_failed"
RECIPIENT_BLOCKED: Final = "recipient_blocked"
PROCESSING_ERROR: Final = "processing_error"
# Cancellations: by the rules (core/engine.py), the scheduler, an operator.
CANCELLED_BY_EVENT: Final = "cancelled_by_event"
CANCELLED_BY_RULE: Final = "cancelled_by_rule"
REARMED: Final = "rearmed"
RULESET_REMOVED: Final = "ruleset_removed"
CANCELLED_BY_OPERATOR: Final = "cancelled_by_operator"

# Code -> (the statuses it comes with, what it means): the documentation's table is checked against it.
REASONS: Final[dict[str, tuple[str, str]]] = {
    CHANNEL_NOT_INSTALLED: ("suppressed", "no plugin provides the channel the rule names"),
    CHANNEL_NOT_CONFIGURED: ("suppressed", "the channel's plugin is installed but its settings are missing"),
    CHANNEL_ERROR: ("suppressed, failed", "the plugin's own checks or its send raised an error"),
    SUPPRESSION_LIST: ("suppressed", "the contact is on the channel's suppression list (e.g. blocked)"),
    NO_CONSENT: ("suppressed", "a marketing message and no consent for the channel"),
    UNREACHABLE: ("suppressed", "no usable address for the channel (no email, no push token, bounced)"),
    GUARD_FAILED: ("suppressed", "the send's guard no longer holds (price changed, out of stock again)"),
    QUIET_HOURS: ("scheduled", "postponed to the end of quiet hours in the contact's time zone"),
    FREQUENCY_CAP: ("suppressed", "the channel's daily cap of marketing messages is reached"),
    HELD_OUT: ("held_out", "the contact is in the ruleset's holdout group: it would have been sent"),
    TEMPLATE_ERROR: ("failed", "the template is missing or could not be rendered"),
    PROVIDER_REJECTED: ("failed", "the provider refused the message for good (4xx, SMTP 5xx)"),
    PROVIDER_ERROR: ("scheduled, dead", "the provider failed for now (5xx, 429, connection error)"),
    TIMEOUT: ("scheduled, dead, uncertain", "no answer from the provider within the send timeout"),
    INTERRUPTED: ("uncertain", "the send was cut short (a crash) and may have arrived; not repeated"),
    DELIVERY_FAILED: ("failed", "the provider reported later that the message could not be delivered"),
    RECIPIENT_BLOCKED: (
        "blocked",
        "the provider refused at once: the recipient opted out (SMS error 21610); the channel is suppressed",
    ),
    PROCESSING_ERROR: ("failed", "the message's record could not be processed (damaged document)"),
    CANCELLED_BY_EVENT: ("cancelled", "an event named in the send's `cancel_on` arrived"),
    CANCELLED_BY_RULE: ("cancelled", "a rule's `cancel` action cancelled it"),
    REARMED: ("cancelled", "a repeat of its trigger replaced it with a new send"),
    RULESET_REMOVED: ("cancelled", "its ruleset is no longer loaded"),
    CANCELLED_BY_OPERATOR: ("cancelled", "POST /v1/messages/{id}/cancel or `rulesvc messages cancel`"),
}


def split_code(text: str | None, default: str) -> tuple[str, str | None]:
    """(code, detail) of a plugin's reason: a plugin may start it with a code of this table and a colon
    (`template_error: ...`) to name its own; otherwise `default`."""
    if text:
        code, sep, rest = text.partition(": ")
        if sep and code in REASONS:
            return code, rest
    return default, text

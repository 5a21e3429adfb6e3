"""A minimal third-party channel: appends each message to a file named by RULESVC_CHANNEL_ECHO_OUTBOX."""

import json

from rulesvc import hookimpl
from rulesvc.channels import Delivery


class EchoChannel:
    name = "echo"
    idempotent = True

    def __init__(self, config):
        self.outbox = config.get("outbox")

    def status(self):
        return (True, f"writes to {self.outbox}") if self.outbox else (False, "missing setting: outbox")

    def reachable(self, contact):
        return None

    async def send(self, message):
        with open(self.outbox, "a", encoding="utf-8") as fh:
            fh.write(
                json.dumps({"id": message.message_id, "contact": message.contact_id, **message.content})
                + "\n"
            )
        return Delivery("sent")


@hookimpl
def register_channels(register, config):
    """The echo channel."""
    register(EchoChannel(config("echo")))

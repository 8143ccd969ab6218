"""ClientApp mods: site-side steps around the site's own train function.

Client-side central DP (run config ``central-dp=client-side``): the server's Flower wrapper puts
its clipping norm in the train config, and the site clips its update with Flower's
``fixedclipping_mod`` before it leaves (the server's half is ``strategies.central_dp``).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM


def site_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """ClientApp train mod: Flower's ``fixedclipping_mod`` when the server asks for it.

    Only train messages that carry Flower's clipping-norm key are clipped (client-side central
    DP); everything else passes through. A refusal (a reply without arrays, e.g. an exhausted
    privacy budget) is returned as it is rather than turned into an error.
    """
    config = msg.content.config_records.get("config")
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    inner: dict[str, Message] = {}

    def capture(m: Message, c: Context) -> Message:
        inner["reply"] = call_next(m, c)
        return inner["reply"]

    out = fixedclipping_mod(msg, context, capture)
    reply = inner.get("reply")
    if reply is not None and not reply.has_error() and not reply.content.array_records:
        return reply
    return out

"""Before round 1: every site's images must have the channels the model takes.

The server asks each connected site (a Flower ``query`` message) for its dataset's channel names;
sites answer with those names and their count only (``channel-names`` such as ``T2``, ``ADC``).
The study stops before any training when a site's channel count differs from ``in-channels``,
or, for multi-channel images, when its channel names (in order) differ from the other sites'.
Single-channel sites may differ in modality (a CT and an MR site normalise their own images).
A site that cannot answer (invalid dataset, older ClientApp) is left to the rounds, which
exclude it with a reason as before. The agreed names are written to ``RUN_DIR/channels.json``
so ``fedimaging predict`` and the bundle export normalise each channel as training did.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedimaging.io import atomic_write_json

log = logging.getLogger("fedimaging.server")
CHANNELS_FILE = "channels.json"
CHANNEL_NAME_RE = re.compile(r"[A-Za-z0-9 ._+-]{1,32}")


class ChannelMismatchError(RuntimeError):
    """Sites disagree about the image channels; the message names the site."""


def sendable_channel_names(names: list[str]) -> list[str]:
    """Channel names as a site may send them: short protocol names only, anything else replaced."""
    return [n if CHANNEL_NAME_RE.fullmatch(n) else f"channel{i}" for i, n in enumerate(names)]


def check_channels(described: dict[str, list[str]], in_channels: int) -> list[str]:
    """The agreed channel names of ``described`` (site -> names), or raise naming the site that differs."""
    if not described:
        return []
    for site, names in sorted(described.items()):
        if len(names) != in_channels:
            raise ChannelMismatchError(
                f"site {site!r} has {len(names)} image channel(s) {names} but this run's model takes "
                f"in-channels={in_channels}; set --run-config 'in-channels={len(names)}' if every site has "
                f"{len(names)}, or fix that site's dataset")
    reference_site, reference = sorted(described.items())[0]
    if in_channels > 1:
        for site, names in sorted(described.items()):
            if [n.upper() for n in names] != [n.upper() for n in reference]:
                raise ChannelMismatchError(
                    f"site {site!r} has image channels {names} but site {reference_site!r} has {reference}: "
                    "every site's dataset.json channel_names must list the same channels in the same order")
    return reference


def check_site_channels(grid, in_channels: int, run_dir: Path, timeout: float | None = None) -> list[str]:
    """Ask every connected site for its channels, check them, write ``channels.json``; see module doc."""
    nodes = sorted(grid.get_node_ids())
    content = RecordDict({"config": ConfigRecord({"query": "channels"})})
    messages = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    described: dict[str, list[str]] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        site = None if reply.has_error() else reply.content.get("site")
        if site is None or "channel-names" not in site:
            log.warning("A site could not describe its channels (%s); the rounds will decide",
                        reply.error.reason if reply.has_error() else "no channel names in its answer")
            continue
        described[str(site["site-name"])] = [str(n) for n in site["channel-names"]]
    names = check_channels(described, in_channels)
    if names:
        atomic_write_json(Path(run_dir) / CHANNELS_FILE, {"in-channels": in_channels, "channel-names": names})
    return names

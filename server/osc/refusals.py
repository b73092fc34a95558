"""Refusing a message: the `/error` reply to its sender, rate-limited per sender, never revealing a server path."""

from __future__ import annotations

import logging
import re

from server.osc.output import Endpoint, OscOutput, OscStats
from server.osc.ratelimit import TokenBuckets

logger = logging.getLogger(__name__)

LOGGED_ERRORS = 10  # internal errors logged in full before only every 1000th is

# Absolute paths in /error reasons: POSIX or Windows, quoted (spaces allowed) or bare (two or more parts).
_QUOTED_PATH = re.compile(r"""(['"])((?:[A-Za-z]:)?[\\/][^'"\n]*)\1""")
_BARE_PATH = re.compile(r"""(?<![\w.~\\/-])(?:[A-Za-z]:)?[\\/]+(?:[^\s\\/'"`:;,()<>\[\]]+[\\/]+)+[^\s\\/'"`:;,()<>\[\]]*""")
_SEPARATORS = re.compile(r"[\\/]+")


class Refusals:
    """Counts each refusal and answers its sender with `/error <address> <reason>` within the sender's error budget."""

    def __init__(self, output: OscOutput, stats: OscStats, addresses: frozenset[str], rate: float = 10.0,
                 burst: int = 10) -> None:
        self._output, self._stats, self._addresses = output, stats, addresses
        self._limit = TokenBuckets(rate, burst)

    def reject(self, path: str, reason: str, sender: Endpoint) -> None:
        """A message refused for a reason the sender should hear."""
        self._stats.rejected += 1
        logger.debug("rejected %s from %s: %s", path, sender, reason)
        self.reply(path, reason, sender)

    def internal_error(self, path: str, sender: Endpoint) -> None:
        """Our bug, not the sender's: logged (sparingly, so a broken engine cannot flood the log) and answered."""
        self._stats.internal_errors += 1
        count = self._stats.internal_errors
        if count <= LOGGED_ERRORS or count % 1000 == 0:
            logger.exception("internal error handling %s from %s (#%d)", path, sender, count)
        self.reply(path, "internal error", sender)

    def reply(self, path: str, reason: str, sender: Endpoint) -> None:
        """Send `/error <path> <reason>` unless the sender's error budget is spent; never reveals server paths."""
        if self._limit.allow(sender):
            self._output.send_error(sender, path, sanitise_reason(reason, self._addresses))
        else:
            self._stats.errors_suppressed += 1


def sanitise_reason(reason: str, keep: frozenset[str] = frozenset()) -> str:
    """`reason` with every absolute path (POSIX or Windows) cut to its last component; paths in `keep` stay.

    The last line of defence for `/error`: whatever an engine error says, a client
    never learns where the server keeps its files. OSC addresses look like paths, so
    the server's own (`keep`) are left alone.
    """
    if "/" not in reason and "\\" not in reason:
        return reason

    def last_part(match: re.Match[str]) -> str:
        text = match.group(0)
        if text in keep:
            return text
        parts = [part for part in _SEPARATORS.split(text) if part]
        return parts[-1] if parts else ""

    def quoted(match: re.Match[str]) -> str:
        quote, text = match.group(1), match.group(2)
        parts = [part for part in _SEPARATORS.split(text) if part]
        if text in keep or len(parts) < 2:  # one part ("/etc") names no place on this machine
            return match.group(0)
        return f"{quote}{parts[-1]}{quote}"

    return _BARE_PATH.sub(last_part, _QUOTED_PATH.sub(quoted, reason))

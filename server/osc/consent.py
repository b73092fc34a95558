"""Who has proven they want output, and what the others may be sent: reflection-proof by construction.

Every destination that is not configured (`--send`) is an *entry*: a `/hello`
destination or a stream subscription, with the senders (host:port) that asked for it,
its *requesters*. A destination is **proven** when the configuration names it or a
datagram came from it, its own host:port: it asked itself (`/hello` or `/subscribe`
with no port, or its own), or, named by another port, it has since sent anything at
all. A proven destination gets what it asked for, within its stream's rate.

A destination that another port named and that has not spoken is sent only what one of
its requesters pays for. Each such requester (a *sponsor*) holds a credit in bytes: it
starts at `PROBE_BYTES` (`AMPLIFICATION` times the smallest request that names a port,
`/hello P`, 16 bytes), grows by `AMPLIFICATION` bytes for every byte the sponsor sends
(anything: its gestures pay for the answers to its other port), and holds at most
`BANK_BYTES`. A datagram to an unproven destination spends its length from a sponsor's
credit, or is not sent (counted in `osc_unproven_withheld`). So whoever names a port
that has not spoken can make the server send it at most `AMPLIFICATION` times what the
namer itself sent, however it asks and however many ports it names: the server cannot be
pointed at a port that has not spoken. (Over UDP a datagram forged with a port's address
counts as that port's own: beyond loopback, `--allow` limits who may send.)

Who may change an entry: the destination itself (its word ends it whoever asked; asking
for itself makes the entry its own, and then nobody else's request changes it), and
each requester its own request (the entry ends with its last requester). Nobody else.
A sender is a requester of at most `MAX_PER_SENDER` entries, an entry has at most
`MAX_REQUESTERS` requesters (a newcomer replaces the quietest one that is not the
destination itself), so the bookkeeping is bounded by the destination lists.

`heard` maps every endpoint in an entry (destination or requester) to the loop time of
its last datagram; the protocol updates it (`hear`) for those endpoints only, so a
datagram from anyone else costs one dictionary lookup.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

Endpoint = tuple[str, int]

AMPLIFICATION = 4  # bytes an unproven destination may be sent per byte its sponsor sent
PROBE_BYTES = 64  # a new sponsor's first credit: AMPLIFICATION x `/hello P` (16 bytes), the smallest request naming a port
BANK_BYTES = 4096  # the most credit a sponsor holds: the largest burst its past traffic can buy
MAX_PER_SENDER = 8  # entries (streams and /hello destinations) one sender may have asked for
MAX_REQUESTERS = 4  # senders that asked for one entry


class TooMany(ValueError):
    """A sender has asked for as many destinations as it may."""


class Taken(ValueError):
    """The destination asked for itself: nobody else can change it."""


class Consent:
    """The ledger of every non-configured destination: proven or not, who sponsors it, their credit, who was heard when."""

    def __init__(self, *, factor: float = AMPLIFICATION, probe: float = PROBE_BYTES, bank: float = BANK_BYTES,
                 max_per_sender: int = MAX_PER_SENDER) -> None:
        self._factor, self._probe, self._bank, self._max = float(factor), float(probe), float(bank), max_per_sender
        self.configured: frozenset[Endpoint] = frozenset()
        self.heard: dict[Endpoint, float] = {}  # every endpoint of an entry -> its last datagram (loop time)
        self._destination: dict[Endpoint, int] = {}  # endpoint -> entries it is the destination of
        self._requests: dict[Endpoint, int] = {}  # sender -> entries it asked for (its own included)
        self._sponsored: dict[Endpoint, int] = {}  # sender -> entries it asked for at another port
        self._credit: dict[Endpoint, float] = {}  # sponsor -> bytes it may still have sent to unproven destinations
        self._proven: set[Endpoint] = set()  # destinations that have sent us something (while they are one)

    # --- entries come and go ---

    def check(self, sender: Endpoint) -> None:
        """Raise TooMany if `sender` may ask for no more entries."""
        if self._requests.get(sender, 0) >= self._max:
            raise TooMany(f"a sender may ask for at most {self._max} streams and /hello destinations; "
                          "/unsubscribe one first")

    def join(self, destination: Endpoint, requester: Endpoint, now: float) -> None:
        """`requester` (which just sent, at `now`) asked for an entry at `destination`."""
        self._destination[destination] = self._destination.get(destination, 0) + 1
        self._requests[requester] = self._requests.get(requester, 0) + 1
        self.heard[requester] = now
        self.heard.setdefault(destination, -math.inf)
        if requester == destination:
            self._proven.add(destination)
        else:
            self._sponsored[requester] = self._sponsored.get(requester, 0) + 1
            self._credit.setdefault(requester, self._probe)

    def leave(self, destination: Endpoint, requester: Endpoint) -> None:
        """Undo one `join`."""
        if _release(self._destination, destination):
            self._proven.discard(destination)
        _release(self._requests, requester)
        if requester != destination and _release(self._sponsored, requester):
            del self._credit[requester]
        for endpoint in (destination, requester):
            if endpoint not in self._destination and endpoint not in self._requests:
                self.heard.pop(endpoint, None)

    # --- the protocol reports who sent what ---

    def hear(self, sender: Endpoint, at: float, size: int) -> None:
        """A datagram of `size` bytes came from `sender` (an endpoint of some entry) at loop time `at`."""
        self.heard[sender] = at
        if sender in self._destination:
            self._proven.add(sender)
        credit = self._credit.get(sender)
        if credit is not None:
            credit += self._factor * size
            self._credit[sender] = credit if credit < self._bank else self._bank

    # --- sending ---

    def proven(self, destination: Endpoint) -> bool:
        return destination in self._proven or destination in self.configured

    def allows(self, destination: Endpoint, requesters: Iterable[Endpoint], size: int) -> bool:
        """May `size` bytes go to `destination` now? Proven: yes; else if a requester pays for them (spent)."""
        if destination in self._proven or destination in self.configured:
            return True
        credit = self._credit
        for requester in requesters:
            left = credit.get(requester)
            if left is not None and left >= size:
                credit[requester] = left - size
                return True
        return False

    def last(self, endpoints: Iterable[Endpoint]) -> float:
        """When the latest of `endpoints` was heard (-inf if never)."""
        heard = self.heard
        return max((heard.get(e, -math.inf) for e in endpoints), default=-math.inf)

    def credit(self, sponsor: Endpoint) -> float | None:
        return self._credit.get(sponsor)


def _release(counts: dict[Endpoint, int], key: Endpoint) -> bool:
    """Decrement `counts[key]`; True (and the key gone) when it reaches 0."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
        return False
    counts.pop(key, None)
    return True


class Entries:
    """One list of entries (the `/hello` destinations, or one stream's subscribers): destination -> requesters.

    Keeps the ledger (`Consent`) in step. The caller checks its list's capacity and the
    sender's cap (`Consent.check`) before `add`ing a request that is not there yet.
    """

    def __init__(self, consent: Consent, max_requesters: int = MAX_REQUESTERS) -> None:
        self.consent = consent
        self.requesters: dict[Endpoint, dict[Endpoint, None]] = {}  # destination -> who asked, oldest first
        self._max_requesters = max_requesters

    def __contains__(self, destination: object) -> bool:
        return destination in self.requesters

    def __len__(self) -> int:
        return len(self.requesters)

    def asked(self, destination: Endpoint, requester: Endpoint) -> bool:
        return requester in self.requesters.get(destination, ())

    def check(self, destination: Endpoint, requester: Endpoint) -> None:
        """Raise unless `requester` may ask for `destination` here: Taken if the destination asked for itself
        (it is its own), TooMany if the requester has asked for its most. Asking again is always fine."""
        requesters = self.requesters.get(destination)
        if requesters is not None:
            if requester in requesters:
                return
            if destination in requesters:
                raise Taken(f"{destination[0]}:{destination[1]} asked for this itself: only it can change it")
        self.consent.check(requester)

    def add(self, destination: Endpoint, requester: Endpoint, now: float) -> bool:
        """Record that `requester` asked for `destination` at `now` (`check` first); True if the destination is new
        here. The destination asking for itself makes the entry its own: the others' requests are dropped."""
        requesters = self.requesters.get(destination)
        if requesters is not None and requester in requesters:
            self.consent.heard[requester] = now
            return False
        new = requesters is None
        if requesters is None:
            requesters = self.requesters[destination] = {}
        elif requester == destination:
            for other in list(requesters):
                del requesters[other]
                self.consent.leave(destination, other)
        elif len(requesters) >= self._max_requesters:  # the quietest other requester makes room
            heard = self.consent.heard
            victim = min((r for r in requesters if r != destination), key=lambda r: heard.get(r, -math.inf))
            self.withdraw(destination, victim)
        requesters[requester] = None
        self.consent.join(destination, requester, now)
        return new

    def withdraw(self, destination: Endpoint, requester: Endpoint) -> bool:
        """`requester` takes back its request; the entry ends with its last requester. False if it had none."""
        requesters = self.requesters.get(destination)
        if requesters is None or requester not in requesters:
            return False
        del requesters[requester]
        self.consent.leave(destination, requester)
        if not requesters:
            del self.requesters[destination]
        return True

    def remove(self, destination: Endpoint) -> bool:
        """End the entry whoever asked for it (the destination's own word, or an eviction). False if absent."""
        requesters = self.requesters.pop(destination, None)
        if requesters is None:
            return False
        for requester in requesters:
            self.consent.leave(destination, requester)
        return True

    def withdraw_or_remove(self, destination: Endpoint, sender: Endpoint) -> bool:
        """What `/unsubscribe` from `sender` does here: the destination ends its entry, a requester its request."""
        return self.remove(destination) if sender == destination else self.withdraw(destination, sender)

    def last(self, destination: Endpoint, first: dict[Endpoint, Endpoint] | None = None) -> float:
        """When the destination or any of its requesters was last heard; with `first` (requester -> the first
        destination it asked for here), only the requesters whose first it is count."""
        heard = self.consent.heard
        requesters = self.requesters[destination]
        if first is not None:
            requesters = {r: None for r in requesters if first.get(r) == destination}
        return max(heard.get(destination, -math.inf), self.consent.last(requesters))

    def idlest(self, *, before: float = math.inf, one_each: bool = False) -> Endpoint | None:
        """The destination whose endpoints were heard longest ago, if that was before `before`; oldest first on ties,
        and one that never proved itself before one that did. `one_each`: a requester's own talk keeps only the
        first destination it asked for here alive (so one busy socket cannot shield many)."""
        first: dict[Endpoint, Endpoint] | None = None
        if one_each:
            first = {}
            for destination, requesters in self.requesters.items():
                for requester in requesters:
                    first.setdefault(requester, destination)
        proven = self.consent.proven
        victim: Endpoint | None = None
        key = (math.inf, True)
        for destination in self.requesters:
            last = self.last(destination, first)
            if last < before and (last, proven(destination)) < key:
                victim, key = destination, (last, proven(destination))
        return victim

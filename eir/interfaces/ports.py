"""What the interfaces may see of the running server (eir.serve.server.EirServer), as typed
protocols: the admin API, /metrics and the N5g-eir service read these and nothing else, so
that eir.interfaces never imports eir.serve (the server imports the interfaces, not back).
"""

from __future__ import annotations

from typing import Any, Collection, Coroutine, Protocol

from eir.check.service import EquipmentCheck
from eir.core.config import Settings
from eir.core.decision import RuleSet


class WorkerGatherer(Protocol):
    """The supervisor of several workers (eir.serve.workers.Supervisor), as the interfaces
    use it: one question to every worker, their answers in a list; the workers' pids."""

    async def ask_all(self, question: str) -> list: ...

    def worker_pids(self) -> dict[int, int]: ...  # {index: pid} of the workers serving now


class ServerView(Protocol):
    """The state of a running server that the interfaces read (event-loop thread): read
    only, but for the actions the interfaces take: reload the lists, list the peers, run a
    task."""

    @property
    def settings(self) -> Settings: ...

    @property
    def rule_set(self) -> RuleSet: ...  # the one in force now: a reload swaps it whole

    @property
    def check(self) -> EquipmentCheck: ...  # the check the interfaces run (and its rule set)

    @property
    def observations(self) -> Any: ...  # None, or eir.check.observations.ObservationLog

    @property
    def audit(self) -> Any: ...  # None, or eir.core.logs.AuditLog

    @property
    def counters(self) -> Any: ...  # eir.interfaces.metrics.DiameterCounters

    @property
    def sync_counters(self) -> Any: ...  # eir.lists.sync.SyncCounters

    @property
    def reload_counts(self) -> dict: ...

    @property
    def connections(self) -> Collection[Any]: ...  # the Diameter connections of this process

    @property
    def supervisor(self) -> WorkerGatherer | None: ...  # None unless this process has workers

    @property
    def worker_socket(self) -> Any: ...  # None unless this process is a worker

    @property
    def sbi(self) -> Any: ...  # None, or the N5g-eir service (eir.interfaces.sbi.N5gEir)

    @property
    def duplicates(self) -> Any: ...  # None, or eir.diameter.duplicates.DuplicateCache

    @property
    def peer_identities(self) -> Any: ...  # None, or eir.diameter.identities.PeerIdentities

    @property
    def listening(self) -> bool: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def last_reload_error(self) -> str | None: ...

    async def reload_lists(self) -> bool: ...

    async def sync_now(self) -> str: ...  # one sync from sync.source, said in a sentence

    def peer_infos(self) -> list[dict]: ...

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None: ...

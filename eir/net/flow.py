"""Flow control shared by the Diameter and the N5g-eir connections (asyncio protocols)."""

from __future__ import annotations

import asyncio


class ReadGate:
    """Reads from a peer only while it reads its answers and its work leaves room.

    A mixin for an asyncio protocol with a `transport`: when the transport's write buffer goes
    above its limit (`pause_writing`), the peer does not read its answers as fast as it sends
    requests, so its requests are not read either until the answers drain, rather than
    buffering answers without bound (TCP then pushes back on that peer alone). `_may_read`
    adds the protocol's own condition (its queue, or frames waiting for a turn)."""

    transport: asyncio.Transport
    _reading = True  # the transport's reading state
    _writing = True  # False while the transport's write buffer is above its limit

    def _may_read(self) -> bool:
        raise NotImplementedError

    def pause_writing(self) -> None:
        self._writing = False
        self._set_reading()

    def resume_writing(self) -> None:
        self._writing = True
        self._set_reading()

    def _set_reading(self) -> None:
        reading = self._writing and self._may_read()
        if reading is not self._reading and not self.transport.is_closing():
            self._reading = reading
            if reading:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

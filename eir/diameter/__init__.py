"""Diameter, sans-IO: codec, dictionary, validation and the peer state machine.

Nothing in this package touches a socket or a clock: bytes and times go in, bytes and
events come out. `eir.serve.server` is the asyncio shell around it.
"""

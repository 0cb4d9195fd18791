"""Everything that crosses a process boundary, and nothing else.

A leaf package: it imports nothing else of vserve, so every process (the torch-free
supervisor and API servers, the engines, a user's script) can speak it. One module per link
(see ``docs/design/architecture.md``); one tagged union per direction of a link that carries
more than one kind of message, always decoded against that union — never pickle, never a
string ``kind`` to dispatch on:

- :mod:`~vserve.protocol.sampling`  ``SamplingParams``, carried inside engine requests
- :mod:`~vserve.protocol.requests`  front end → engine (ADD / ABORT / stats), engine → front end
  (announce)
- :mod:`~vserve.protocol.outputs`   engine → front end: step outputs, stats replies, death notices
- :mod:`~vserve.protocol.load`      engine → coordinator load reports, coordinator → API server
  snapshots
- :mod:`~vserve.protocol.control`   the supervisor's handshake/control link and the API server's
  start-up arguments

Structs are ``array_like`` (small frames), ``omit_defaults`` and ``gc=False`` (short-lived,
no cycles).
"""

from __future__ import annotations

import msgspec

#: msgpack-encode any protocol struct. Thread-safe: msgspec's encoder keeps no state between
#: calls.
encode = msgspec.msgpack.Encoder().encode

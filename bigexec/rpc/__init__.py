"""bigexec's RPC: a lean HTTP/1.1 transport, optionally over mutual TLS.

Its modules, from the bottom up:

- ``codec``: Python values to wire messages and back (pickle 5, out-of-band buffers);
- ``heads``: HTTP start lines and headers, parsed strictly; the status codes;
- ``remote_errors``: how an exception travels (the error tuple);
- ``stream_sources``: which values travel as byte streams;
- ``framing``: ``Content-Length`` bodies, chunked stream frames, and the size limits;
- ``stream``: ``Stream``, a byte stream arriving over a connection;
- ``sockets``: the TCP options of every connection;
- ``wire``: the protocol's overview, and all of the above's wire names in one namespace;
- ``pool``: the client's persistent connections per address;
- ``client``: the call protocol (a call's request and reply, and when it is resent);
- ``server``: serves a ``ServiceRegistry``, a thread per connection;
- ``faults``: breaks replies on purpose, for chaos tests.
"""

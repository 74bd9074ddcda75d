"""bigexec's RPC: a lean HTTP/1.1 transport, optionally over mutual TLS.

``codec`` turns Python values into wire messages, ``http`` holds the little HTTP/1.1 both ends
speak, ``server`` dispatches requests to services, ``client`` keeps a connection pool per
address and runs calls.
"""

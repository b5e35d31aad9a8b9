"""Connectors: the ends that face the outside world, one module per outside system.

    zmq      a foreign ZeroMQ peer (a detector's stream, a plain PULL script)
    redis    Redis channels and streams
    codecs   how a foreign peer's frames become Messages and back
    frames   one broker value per message (packing a wire message's frames)
    retry    reconnect backoff and drop counts shared by every connector

Connectors are plain Listener/Publisher classes: they import only the core API, like
the user's own stages.
"""

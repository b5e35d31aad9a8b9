"""Connectors: the ends that face the outside world, one module per outside system.

    zmq      a foreign ZeroMQ peer (a detector's stream, a plain PULL script)
    redis    Redis channels and streams
    codecs   how a foreign peer's frames become Messages and back
    frames   one broker value per message (packing a wire message's frames)
    retry    reconnect backoff and drop counts shared by every connector
    viewer   browsers: the latest frame, plots and runs over WebSocket (extra ``web``);
             its web side in _viewer_app, _render (frames to PNG), _webserve (aiohttp
             on a thread of its own, plotly.js from the installed package)

Connectors are plain Listener/Publisher classes: they import only the core API, like
the user's own stages.
"""

"""Connectors: the ends that face the outside world, one module per outside system.

    zmq      a foreign ZeroMQ peer (a detector's stream, a plain PULL script)
    redis    Redis channels and streams
    nats     NATS JetStream (durable pull consumer, PubAck) and core subjects (extra
             ``nats``; its helpers in _nats_client, the publisher in _nats_publisher,
             nats-py's event loop on a thread of its own in _asyncio_thread)
    broker   what the broker ends share: backlog, templated keys, acks after hand-on
    codecs   how a foreign peer's frames become Messages and back
    frames   one broker value per message (packing a wire message's frames)
    retry    reconnect backoff and drop counts shared by every connector
    viewer   browsers: the latest frame, plots and runs over WebSocket (extra ``web``);
             its web side in _viewer_app, _render (frames to PNG), _webserve (aiohttp
             on a thread of its own, plotly.js from the installed package), the
             past it steps through in _viewer_history (a ring) and _viewer_recording
    recfile  the recorder's run files (format, writer, reader, index)
    recording  Recorder and Replay: runs kept as they travelled, played back
    hdf5     NeXus/HDF5 files, one per run, SWMR, direct chunks (extra ``hdf5``;
             the layout in _nexus_layout)
    tiled    runs into a Tiled server: a container per run (extra ``tiled``)
    pyfai    azimuthal integration by pyFAI, an operator (extra ``pyfai``; its
             geometry in _pyfai_geometry)
    dectris, dectris_v1, htype, cbor, series, simulate: detector streams (docs/detectors.md)

Connectors are plain Listener/Publisher classes: they import only the core API, like
the user's own stages.
"""

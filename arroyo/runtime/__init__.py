"""The stage runtime: what runs inside one ``arroyo-stage`` process.

    process   StageProcess: links in -> the user's object -> links out, signals, drain
    roles     the operators and publisher wrapped around the user's object
    link      what both link patterns share (identities, control frames, sockets)
    credit    PUSH links: ROUTER/DEALER with receiver-granted credit
    pubsub    PUB links: XPUB/SUB that waits for declared subscribers
    merge     run boundaries where scaled workers fan back in
    stats     counters and the per-process stats file
    live      live options: watched in run_dir, applied between two messages
    inline    the whole graph in one process with in-memory links

It imports the core API and nothing of ``arroyo.control``: a stage never drives
supervisor.
"""

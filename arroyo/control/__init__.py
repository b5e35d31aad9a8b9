"""Process control: everything that starts, watches and stops stage processes.

    cli, clibase, commands   the ``arroyo`` and ``arroyo-stage`` commands
    render                   a topology's supervisord.conf
    supervise                supervisord over XML-RPC: up, down, status, scale
    scaled                   worker counts kept from ``arroyo scale``: said, and undone
    rpcext                   the supervisord rpcinterface that adds and removes workers
    metrics                  the Prometheus text endpoint
    live                     ``arroyo set``: live options of a running stage
    web                      ``arroyo web``: the dashboard in the browser
    demo                     ``scripts/demo``

Control may use every other part of Arroyo; nothing else imports it.
"""

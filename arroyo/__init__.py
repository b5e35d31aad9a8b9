"""Arroyo: stream processing for scientific user facilities.

A pipeline is a graph of stages (listener -> operators -> publishers), each stage its
own process, linked by ZeroMQ and run by supervisord. See README.md and docs/.
"""

from arroyo.errors import ArroyoError, ConfigError, TopologyError, WireError
from arroyo.message import Event, Message, Start, Stop
from arroyo.stage import Listener, Operator, PassThrough, Publisher

__version__ = "0.1.0.dev0"

__all__ = [
    "ArroyoError",
    "ConfigError",
    "Event",
    "Listener",
    "Message",
    "Operator",
    "PassThrough",
    "Publisher",
    "Start",
    "Stop",
    "TopologyError",
    "WireError",
    "__version__",
]

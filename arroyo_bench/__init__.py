"""The benchmark behind ``scripts/bench``: Arroyo beside raw pyzmq in one run.

Outside the ``arroyo`` package on purpose: it is a user of Arroyo, not part of it.
"""

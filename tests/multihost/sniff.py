"""Run in the bridge namespace: count the frames on one bridge port that contain a
marker, for a bounded time (or until the first, with ``until-hit``). Prints ``ready``
once listening, then ``frames=N hits=M``."""

import socket
import sys
import time

marker, seconds, port = sys.argv[1].encode(), float(sys.argv[2]), sys.argv[3]
until_hit = sys.argv[4:] == ["until-hit"]  # stop at the first frame with the marker
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
s.bind((port, 0))
s.settimeout(0.2)
frames = hits = 0
end = time.monotonic() + seconds
print("ready", flush=True)
while time.monotonic() < end:
    try:
        packet = s.recv(65535)
    except TimeoutError:
        continue
    frames += 1
    hits += marker in packet
    if hits and until_hit:
        break
print(f"frames={frames} hits={hits}", flush=True)

"""The Supvisors rpcinterface as Arroyo's per-host supervisord.conf loads it, with
explicit host identities.

Supvisors 0.19 resolves every host of ``supvisors_list``, and finds which one it is
itself, through ``socket.gethostbyaddr``: without working reverse DNS (or /etc/hosts
lines for every host) it refuses to start ("could not define a Supvisors
identification"; Supvisors issue/PR #120). The topology already says which name has
which address, so this factory answers those look-ups from the rendered
``arroyo_hosts = NAME=ADDRESS,...`` and hands everything else to Supvisors' own
``make_supvisors_rpcinterface``. The local instance is then the one whose declared
address is on one of this machine's interfaces, which the inet server binds anyway.

This reaches into ``supvisors.internal_com.mapper.NetworkAddress``, a private class:
the ``multihost`` extra pins ``supvisors>=0.19,<0.20`` and a test checks the patch point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def parse_hosts(text: str) -> dict[str, tuple[str, str]]:
    """``h1=10.0.0.1,h2=...`` -> {name or address: (name, address)}."""
    table: dict[str, tuple[str, str]] = {}
    for item in text.split(","):
        name, sep, address = item.strip().partition("=")
        if not sep or not name or not address:
            msg = f"arroyo_hosts: expected NAME=ADDRESS items, got {item!r}"
            raise ValueError(msg)
        table[name] = table[address] = (name, address)
    return table


def _resolver(table: dict[str, tuple[str, str]], original: Callable[..., None]) -> Any:
    def _get_local_view(self: Any, host_id: str) -> None:
        known = table.get(host_id)
        if known is None:
            original(self, host_id)
            return
        self.host_name, self.aliases, self.ipv4_addresses = known[0], [], [known[1]]

    _get_local_view.arroyo_original = original  # type: ignore[attr-defined]
    return _get_local_view


def install(table: dict[str, tuple[str, str]]) -> None:
    """Answer Supvisors' host look-ups from ``table`` (idempotent)."""
    from supvisors.internal_com import mapper

    current = mapper.NetworkAddress._get_local_view
    original = getattr(current, "arroyo_original", current)
    mapper.NetworkAddress._get_local_view = _resolver(table, original)


def make_rpcinterface(supervisord: Any, arroyo_hosts: str = "", **config: Any) -> Any:
    """supervisord's ``rpcinterface_factory`` for ``[rpcinterface:supvisors]``."""
    from supvisors.plugin import make_supvisors_rpcinterface

    if arroyo_hosts:
        install(parse_hosts(arroyo_hosts))
    return make_supvisors_rpcinterface(supervisord, **config)

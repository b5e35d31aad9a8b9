"""The explicit host identities given to Supvisors (``control.supvisors_plugin``): its
host look-ups are answered from the topology, never from reverse DNS."""

from __future__ import annotations

import logging

import pytest

from arroyo.control.supvisors_plugin import install, parse_hosts

mapper = pytest.importorskip("supvisors.internal_com.mapper")


def test_declared_hosts_resolve_without_dns() -> None:
    table = parse_hosts("h1=10.77.9.11, h2=10.77.9.12")
    assert table["h2"] == table["10.77.9.12"] == ("h2", "10.77.9.12")
    install(table)
    install(table)  # idempotent: wraps Supvisors' own resolver once
    log = logging.getLogger("test")
    by_name = mapper.NetworkAddress(log, host_id="h1")
    assert (by_name.host_name, by_name.ipv4_addresses) == ("h1", ["10.77.9.11"])
    by_address = mapper.NetworkAddress(log, host_id="10.77.9.12")
    assert by_address.host_matches("10.77.9.12") and by_address.host_name == "h2"
    assert mapper.NetworkAddress._get_local_view.arroyo_original is not None


def test_a_bad_host_list_names_the_item() -> None:
    with pytest.raises(ValueError, match="h2"):
        parse_hosts("h1=10.0.0.1,h2")

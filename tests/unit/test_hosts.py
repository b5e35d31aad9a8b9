"""``[hosts]``, ``host =`` / ``hosts =`` and the cross-host checks of ``arroyo check``."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from arroyo.errors import TopologyError
from arroyo.hosts import bound_ports, ephemeral_clashes
from arroyo.topology import load

BASE = """
[topology]
name = mh
{topology}

[hosts]
h1 = 10.77.0.11
h2 = 10.77.0.12
h3 = 10.77.0.13

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 10
shape = 4, 4
{det}

[stage:reduce]
role = operator
class = arroyo.stage:PassThrough
input = det{det_link}
workers = 2
{reduce}

[stage:sink]
role = publisher
class = stages.sinks:Discard
input = reduce{sink_link}
{sink}
"""


def write(tmp_path: Path, **parts: str) -> Path:
    values = {"topology": "", "det": "host = h1", "reduce": "hosts = h2, h3", "sink": "host = h2"}
    values |= {"det_link": "", "sink_link": ""}
    values.update(parts)
    path = tmp_path / "mh.ini"
    path.write_text(textwrap.dedent(BASE.format(**values)))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(TopologyError) as e:
        load(path)
    return e.value.problems


def test_cross_host_links_get_tcp_on_the_binders_address(tmp_path: Path) -> None:
    t = load(write(tmp_path, topology="security = curve\npeer_timeout = 2"))
    assert t.hosts == {"h1": "10.77.0.11", "h2": "10.77.0.12", "h3": "10.77.0.13"}
    assert t.multihost and t.security == "curve" and t.peer_timeout == 2.0
    assert t.stages["det"].pinned == "h1"
    assert t.stages["reduce"].hosts == ("h2", "h3") and not t.stages["reduce"].pinned
    links = {link.name: link for link in t.links}
    assert links["det->reduce"].endpoint == "tcp://10.77.0.11:29100"
    assert links["reduce->sink"].endpoint == "tcp://10.77.0.12:29100"
    assert all(link.curve for link in t.links)
    assert t.supervisor_port == 29000
    assert t.keys_dir == (tmp_path / "mh-keys").resolve()


def test_a_link_within_one_host_stays_ipc_and_plain(tmp_path: Path) -> None:
    t = load(write(tmp_path, topology="security = curve", reduce="host = h2"))
    links = {link.name: link for link in t.links}
    assert links["reduce->sink"].endpoint.startswith("ipc://")
    assert not links["reduce->sink"].curve
    assert links["det->reduce"].curve


def test_ports_count_up_per_binder_host_and_skip_explicit_ones(tmp_path: Path) -> None:
    t = load(
        write(
            tmp_path,
            topology="port_range = 48000-48010",
            sink_link=" (push tcp://h2:48000)",
            det="host = h2",
        )
    )
    links = {link.name: link.endpoint for link in t.links}
    assert links["reduce->sink"] == "tcp://h2:48000"
    assert links["det->reduce"] == "tcp://10.77.0.12:48001"


def test_unknown_and_undeclared_hosts_are_reported(tmp_path: Path) -> None:
    found = problems(write(tmp_path, sink="host = h9"))
    assert any("[stage:sink] host = 'h9': unknown host 'h9'" in p for p in found), found
    path = tmp_path / "nohosts.ini"
    text = write(tmp_path, reduce="", sink="").read_text()
    path.write_text(
        text.replace("[hosts]\nh1 = 10.77.0.11\nh2 = 10.77.0.12\nh3 = 10.77.0.13\n", "")
    )
    found = problems(path)
    assert any("no [hosts] section declares it" in p for p in found), found


def test_cross_host_ipc_unpinned_binder_and_reused_port(tmp_path: Path) -> None:
    found = problems(
        write(
            tmp_path,
            det="hosts = h1, h3",
            det_link=" (push ipc:///tmp/arroyo-x.sk)",
            sink_link=" (push tcp://10.77.0.12:29000)",
        )
    )
    text = "\n".join(found)
    assert "crosses hosts: give it a tcp:// endpoint" in text
    assert "[stage:det] hosts: binds link det->reduce, which crosses hosts: pin it" in text
    assert "port 29000 on host h2 is the supervisor_port" in text


def test_the_same_port_twice_on_one_host(tmp_path: Path) -> None:
    path = write(tmp_path, sink_link=" (push tcp://10.77.0.12:5000)")
    text = path.read_text() + textwrap.dedent(
        """
        [stage:sink2]
        role = publisher
        class = stages.sinks:Discard
        input = det (push tcp://h2:5000)
        host = h2
        """
    )
    path.write_text(text)
    found = problems(path)
    assert any("port 5000 on host h2 is already used by link reduce->sink" in p for p in found)


def test_bad_values_name_their_key(tmp_path: Path) -> None:
    found = problems(
        write(
            tmp_path,
            topology="security = tls\npeer_timeout = 0.01\nport_range = 5-3",
            sink="host = h2\non_host_lost = panic",
        )
    )
    text = "\n".join(found)
    assert "[topology] security = 'tls'" in text
    assert "[topology] peer_timeout = '0.01': expected 0.3 to 120 seconds" in text
    assert "[topology] port_range = '5-3'" in text
    assert "[stage:sink] on_host_lost = 'panic': expected restart, leave, stop_chain" in text


def test_a_single_host_topology_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "one.ini"
    path.write_text(
        textwrap.dedent(
            """
            [topology]
            name = one
            [stage:det]
            role = listener
            class = stages.synthetic:DetectorSimulator
            frames = 10
            shape = 4, 4
            [stage:sink]
            role = publisher
            class = stages.sinks:Discard
            input = det
            """
        )
    )
    t = load(path)
    assert not t.multihost and t.security == "none" and t.supervisor_port == 0
    assert all(link.endpoint.startswith("ipc://") and not link.curve for link in t.links)


def test_default_ports_lie_below_the_linux_ephemeral_range(tmp_path: Path) -> None:
    # Linux gives outgoing connections ports from 32768-60999 by default: a listening
    # port there can be held by one for a moment, and the stage binding it fails.
    t = load(write(tmp_path))
    ports = bound_ports(t.hosts, t.supervisor_port, t.links, "h1")
    assert ports == [29000, 29100]
    default = tmp_path / "ip_local_port_range"
    default.write_text("32768\t60999\n")
    assert ephemeral_clashes(ports, default) == ([], "32768-60999")


def test_ports_inside_the_ephemeral_range_are_named(tmp_path: Path) -> None:
    t = load(write(tmp_path, topology="port_range = 47100-47899\nsupervisor_port = 47000"))
    assert bound_ports(t.hosts, t.supervisor_port, t.links, "h2") == [47000, 47100]
    narrow = tmp_path / "ip_local_port_range"
    narrow.write_text("47050 60999\n")
    assert ephemeral_clashes([47000, 47100], narrow) == ([47100], "47050-60999")
    assert ephemeral_clashes([47000], tmp_path / "absent") == ([], "")

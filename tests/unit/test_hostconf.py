"""The per-host supervisord.conf and the Supvisors rules of a multi-host topology."""

from __future__ import annotations

import configparser
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

from arroyo.control.hostconf import credentials, render_host, rules_xml, write_host_configs
from arroyo.topology import load

TOPO = """
[topology]
name = mh
run_dir = run
supervisor_port = 47010

[hosts]
h1 = 10.77.0.11
h2 = 10.77.0.12
h3 = 10.77.0.13

[chain:main]
stages = det, reduce, sink

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 10
shape = 4, 4
host = h1

[stage:reduce]
role = operator
class = arroyo.stage:PassThrough
input = det
workers = 2
hosts = h2, h3
on_host_lost = stop_chain

[stage:sink]
role = publisher
class = stages.sinks:Discard
input = reduce
host = h2
"""


def topology(tmp_path: Path):
    path = tmp_path / "mh.ini"
    path.write_text(textwrap.dedent(TOPO))
    return load(path)


def test_each_host_gets_its_inet_server_its_programs_and_the_same_cluster(tmp_path) -> None:
    t = topology(tmp_path)
    confs = {}
    for host in t.hosts:
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(render_host(t, host).split("\n", 1)[1])
        confs[host] = parser
    h2 = confs["h2"]
    assert h2["inet_http_server"]["port"] == "10.77.0.12:47010"
    user, password = credentials(t)
    assert (h2["inet_http_server"]["username"], h2["inet_http_server"]["password"]) == (
        user,
        password,
    )
    assert h2["supervisord"]["environment"] == 'ARROYO_HOST="h2"'
    assert h2["group:main"]["programs"] == "reduce,sink"
    assert "program:det" not in h2 and "program:det" in confs["h1"]
    assert "program:reduce" not in confs["h1"]
    sv = {h: dict(c["rpcinterface:supvisors"]) for h, c in confs.items()}
    assert (
        sv["h1"]["supvisors_list"]
        == "<h1>10.77.0.11:47010,<h2>10.77.0.12:47010,<h3>10.77.0.13:47010"
    )
    assert sv["h1"]["conciliation_strategy"] == "SENICIDE"
    for key in ("supvisors_list", "arroyo_hosts", "starting_strategy", "conciliation_strategy"):
        assert len({s[key] for s in sv.values()}) == 1, key
    assert sv["h3"]["supervisor.rpcinterface_factory"].startswith("arroyo.control.supvisors_plugin")


def test_rules_start_sinks_first_stop_sources_first_and_map_host_loss(tmp_path) -> None:
    t = topology(tmp_path)
    root = ET.fromstring(rules_xml(t))
    (app,) = root.findall("application")
    assert app.get("name") == "main" and app.findtext("start_sequence") == "0"
    progs = {p.get("pattern"): p for p in app.iter("program")}
    seq = {k.strip("^$").split("_")[0]: int(p.findtext("start_sequence")) for k, p in progs.items()}
    assert seq["sink"] < seq["reduce"] < seq["det"]  # Supvisors stops the greatest first
    reduce = progs["^reduce_[0-9]+$"]
    assert reduce.findtext("identifiers") == "h2,h3"
    assert reduce.findtext("running_failure_strategy") == "STOP_APPLICATION"
    assert progs["^det_[0-9]+$"].findtext("running_failure_strategy") == "RESTART_PROCESS"


def test_written_configs_and_secrets_are_private(tmp_path) -> None:
    t = topology(tmp_path)
    paths = write_host_configs(t)
    assert len(paths) == 3
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in paths)
    secret = (t.keys_dir or tmp_path) / "supervisor.secret"
    assert secret.stat().st_mode & 0o777 == 0o600

"""An rpcinterface for supervisord: add or remove one worker of a program in place.

supervisord's own way to change ``numprocs`` (reread + update) removes and re-adds the
whole group, restarting every process in it. Scaling a stage must leave every other
process alone, so this extension (loaded by the rendered config's
``[rpcinterface:arroyo]``) clones a worker's process config for a new index, or drops
a stopped worker, inside the running group. Called as ``arroyo.addWorker`` and
``arroyo.removeWorker`` over the same unix socket as supervisor's own interface.

Loading it also makes a configuration error final: a worker that exits with status 2
(``arroyo-stage``'s "configuration error": bad topology, class that cannot be built)
is put in FATAL instead of being restarted. supervisord only gives up on a process
that fails within ``startsecs`` of its spawn; a stage whose imports and ``__init__``
take longer than that would otherwise be restarted for ever, failing the same way.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from supervisor import events
from supervisor.states import STOPPED_STATES, ProcessStates
from supervisor.xmlrpc import Faults, RPCError

API_VERSION = "1.0"
CONFIG_ERROR = 2  # arroyo-stage's exit status for a configuration error


def _worker_index(name: str, program: str) -> int | None:
    prefix = f"{program}_"
    if name.startswith(prefix) and name[len(prefix) :].isdigit():
        return int(name[len(prefix) :])
    return None


class ArroyoNamespace:
    def __init__(self, supervisord: Any) -> None:
        self.supervisord = supervisord

    # XML-RPC method names are camelCase, as in supervisor's own interface.
    def getAPIVersion(self) -> str:
        return API_VERSION

    def _group(self, group_name: str) -> Any:
        group = self.supervisord.process_groups.get(group_name)
        if group is None:
            raise RPCError(Faults.BAD_NAME, group_name)
        return group

    def addWorker(self, group_name: str, program: str, index: int) -> str:
        """Add worker ``index`` of ``program`` to ``group_name`` (stopped); returns its name."""
        group = self._group(group_name)
        configs = [
            c for c in group.config.process_configs if _worker_index(c.name, program) is not None
        ]
        if not configs:
            raise RPCError(Faults.BAD_NAME, f"{group_name}:{program}")
        name = f"{program}_{index:02d}"
        if name in group.processes:
            return name
        template = configs[0]
        old = template.name
        new = copy.copy(template)
        new.name = name
        new.command = re.sub(r"--worker \d+$", f"--worker {index}", template.command)
        if isinstance(template.stdout_logfile, str):
            new.stdout_logfile = template.stdout_logfile.replace(old, name)
        if isinstance(template.stderr_logfile, str):
            new.stderr_logfile = template.stderr_logfile.replace(old, name)
        group.config.process_configs.append(new)
        group.processes[name] = new.make_process(group)
        return name

    def removeWorker(self, group_name: str, name: str) -> bool:
        """Forget a stopped worker process of ``group_name``."""
        group = self._group(group_name)
        process = group.processes.get(name)
        if process is None:
            raise RPCError(Faults.BAD_NAME, f"{group_name}:{name}")
        if process.get_state() not in STOPPED_STATES:
            raise RPCError(Faults.STILL_RUNNING, f"{group_name}:{name}")
        del group.processes[name]
        group.config.process_configs = [c for c in group.config.process_configs if c.name != name]
        return True


def _config_error_is_final(event: Any) -> None:
    """On a RUNNING -> EXITED transition (supervisord calls this before it decides on
    a restart): a configuration error goes to FATAL, which is never restarted."""
    process = event.process
    if process.exitstatus != CONFIG_ERROR:
        return
    process.spawnerr = "configuration error (exit status 2, see its log): not restarted"
    process.config.options.logger.warn(f"{process.config.name}: {process.spawnerr}")
    process.change_state(ProcessStates.FATAL)


def make_interface(supervisord: Any, **config: Any) -> ArroyoNamespace:
    # supervisord clears its subscribers at each (re)start, before it builds the
    # rpcinterfaces: subscribing here holds for this run of supervisord.
    events.subscribe(events.ProcessStateExitedEvent, _config_error_is_final)
    return ArroyoNamespace(supervisord)

"""A supervisor RPC that fails reaches the user as one line, exit 1, no traceback."""

from __future__ import annotations

import xmlrpc.client

import click
from click.testing import CliRunner

from arroyo.control.clibase import user_errors


def _command(error: Exception) -> click.Command:
    @click.command()
    @user_errors
    def failing() -> None:
        raise error

    return failing


def test_a_fault_is_one_line_and_exit_1():
    fault = xmlrpc.client.Fault(10, "BAD_NAME: main:work_01")
    result = CliRunner().invoke(_command(fault))
    assert result.exit_code == 1
    assert result.output == "supervisord refused the request: BAD_NAME: main:work_01\n"


def test_a_supervisord_gone_mid_command_is_one_line_and_exit_1():
    gone = xmlrpc.client.ProtocolError("unix:///x.sock", 0, "[Errno 111] Connection refused", {})
    result = CliRunner().invoke(_command(gone))
    assert result.exit_code == 1
    assert result.output == "supervisord did not answer: [Errno 111] Connection refused\n"

"""The environment of a single-process DeepSpeed group: a fresh port of its own, launcher settings left alone."""

from __future__ import annotations

import os
import socket

from trainer.engine import _single_process_group_env


def test_an_inherited_port_in_use_is_replaced(monkeypatch):
    # What a Ray worker inherits from a process that holds a group itself: its MASTER_PORT, already listening.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        monkeypatch.setenv("MASTER_PORT", port)
        monkeypatch.setenv("RANK", "3")
        for key in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):  # unset, and restored after the test
            monkeypatch.delenv(key, raising=False)
        _single_process_group_env()
        assert os.environ["MASTER_PORT"] != port
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
        with socket.socket() as s:  # the new port is free
            s.bind(("127.0.0.1", int(os.environ["MASTER_PORT"])))


def test_a_launchers_settings_stand(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    _single_process_group_env()
    assert (os.environ["RANK"], os.environ["MASTER_PORT"]) == ("1", "29555")

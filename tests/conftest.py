"""Test-wide guards: no network, offline Hugging Face libraries, a private cache."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import tempfile

# Set before any HF library is imported, so none of them can reach the Hub or write to the user's cache.
_CACHE = tempfile.mkdtemp(prefix="hfx-tests-hf-home-")
os.environ["HF_HOME"] = _CACHE
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's models are tiny: on a 2-core machine a second intra-op thread only adds synchronisation
# (measured: a ReLoRA test module took 4 min with 2 threads, 1 min with 1). Subprocesses inherit this.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


class NetworkAccessError(RuntimeError):
    """Raised when a test tries to open a connection to anything but this machine."""


def is_local_address(address) -> bool:
    """True for AF_UNIX paths and loopback hosts (127.0.0.0/8, ::1, 'localhost')."""
    if isinstance(address, (str, bytes)):  # AF_UNIX socket path
        return True
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name other than localhost would need DNS: refuse it


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _guarded(real):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not is_local_address(address):
            raise NetworkAccessError(f"test tried to connect to {address!r}: tests must not use the network")
        return real(self, address)

    connect.hfx_network_guard = True
    return connect


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate's state is a process-wide singleton: every test starts and ends with a clean one, so
    a run's mixed precision or accumulation never leaks into the next. (Nothing to do before accelerate
    is first imported.)"""

    def reset():
        if "accelerate.state" in sys.modules:
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(True)
            GradientState._reset_state()

    reset()
    yield
    reset()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs with outgoing connections limited to loopback."""
    monkeypatch.setattr(socket.socket, "connect", _guarded(_real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded(_real_connect_ex))
    yield

"""The package skeleton: import, registry, network guard, CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

import hfx
from hfx.cli import main


def test_version_and_no_network_on_import():
    # The guard is active here: if importing hfx (done above) or re-registering touched the network,
    # the test would have failed with NetworkAccessError.
    assert isinstance(hfx.__version__, str) and hfx.__version__.count(".") == 2
    hfx.register_all()  # idempotent


def test_network_guard_refuses_remote_and_allows_loopback():
    assert socket.socket.connect.hfx_network_guard
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(RuntimeError, match="must not use the network"):
            sock.connect(("192.0.2.1", 80))  # refused before any packet leaves
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


def test_register_auto_model_is_idempotent_and_loads(tmp_path):
    import torch
    import transformers
    from transformers import PreTrainedConfig, PreTrainedModel

    from hfx._registry import register_auto_model

    class TinyConfig(PreTrainedConfig):
        model_type = "hfx_test_tiny"
        width: int = 3

    class TinyModel(PreTrainedModel):
        config_class = TinyConfig
        base_model_prefix = "tiny"

        def __init__(self, config):
            super().__init__(config)
            self.proj = torch.nn.Linear(config.width, config.width)
            self.post_init()

    register_auto_model(TinyConfig, {"AutoModel": TinyModel})
    register_auto_model(TinyConfig, {"AutoModel": TinyModel})
    model = TinyModel(TinyConfig(width=4))
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, TinyModel)
    torch.testing.assert_close(loaded.proj.weight, model.proj.weight, rtol=0, atol=0)

    class Clash(PreTrainedConfig):
        model_type = "llama"

    with pytest.raises(ValueError, match="'llama' is already registered"):
        register_auto_model(Clash, {})


def test_cli_env_prints_versions(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "transformers", "diffusers", "peft", "accelerate", "cuda available", "bf16"):
        assert f"- {name}" in out
    import torch

    assert torch.__version__ in out


def test_cli_env_json(capsys):
    import json

    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["hfx"] == hfx.__version__


@pytest.mark.parametrize("argv", [["nonsense"], ["env", "--no-such-flag"]])
def test_cli_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: hfx")
    assert "Traceback" not in err


def test_python_m_hfx_unknown_command_has_no_traceback():
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "hfx", "nonsense"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "usage: hfx" in proc.stderr and "invalid choice: 'nonsense'" in proc.stderr
    assert "Traceback" not in proc.stderr

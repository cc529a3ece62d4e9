"""What the SIGKILL/resume tests of the model families share: train a recipe to its end, train it again and
SIGKILL that run once a checkpoint exists, resume it; and compare the safetensors the two runs saved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

#: The first lines of a script that runs as a user without hfx would: any import of hfx fails in its process.
BLOCK_HFX = """
import importlib.abc, sys

class BlockHfx(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hfx" or name.startswith("hfx."):
            raise ImportError(f"importing {name} is blocked in this process")

sys.meta_path.insert(0, BlockHfx())
"""

#: A script run in a process where importing hfx fails: load the remote-code export in argv[1] as diffusers
#: would for a user without hfx, and save ``{"type": the pipeline class, "images": CALL}`` to argv[2].
NO_HFX = BLOCK_HFX.replace("{", "{{").replace("}", "}}") + """import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
torch.save({{"type": type(pipe).__name__, "images": {call}}}, sys.argv[2])
"""


def full_killed_resumed(config: dict, tmp_path: Path, kill_at: int, timeout: float = 300
                        ) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """Run ``config`` (a recipe dict) through ``hfx train`` to its end in ``tmp_path/full``; run it again in
    ``tmp_path/killed``, SIGKILL it as soon as ``checkpoint-<kill_at>`` exists (asserting it had not finished)
    and resume it with ``resume_from_checkpoint=latest``. Returns ``(full, killed, the resumed process)``; the
    resumed run has succeeded and said that it resumed."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    command = [sys.executable, "-m", "hfx", "train", str(path)]
    done = subprocess.run([*command, f"output_dir={full}"], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen([*command, f"output_dir={killed}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not (killed / f"checkpoint-{kill_at}").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, f"no checkpoint-{kill_at} before the run ended"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    resumed = subprocess.run([*command, f"output_dir={killed}", "resume_from_checkpoint=latest"], env=env,
                             capture_output=True, text=True, timeout=timeout)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    return full, killed, resumed


def assert_same_weights(full: Path, killed: Path, parts: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each diffusers component ``part`` of the two runs' ``final/`` holds bit-identical tensors; returns them."""
    saved = {}
    for part in parts:
        a = load_file(full / "final" / part / "diffusion_pytorch_model.safetensors")
        b = load_file(killed / "final" / part / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
        saved[part] = a
    return saved

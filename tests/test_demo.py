"""``hfx demo`` as a newcomer meets it: stopped by SIGTERM it exits 143 with one line saying how to continue,
and running it again continues the interrupted training; on a busy machine it picks a safe thread count."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

TINY = ["eval.every_steps=null", "checkpoint.every_steps=null", "log.report_to=[]", "log.every_steps=1"]


def demo_command(out) -> list[str]:
    return [sys.executable, "-m", "hfx", "demo", "--output-dir", str(out), "--per-class", "2", "--steps", "2",
            "--diffusion", "train.max_steps=300", *TINY, "task_options.grid_per_class=0",
            "task_options.unet={block_out_channels: [8, 16, 16], norm_num_groups: 4}",
            "--evaluator", "train.max_steps=3", *TINY]


@pytest.mark.slow
def test_sigterm_during_the_demo_stops_cleanly_and_a_rerun_continues(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "demo"
    proc = subprocess.Popen(demo_command(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "diffusion" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not metrics.is_file() or len(metrics.read_text().splitlines()) < 3:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the diffusion training did not start within 240 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("hfx demo: stopped by signal 15 at step ") and "of ddpm-digits (checkpoint saved)" in last
    assert "again to continue" in last and "hfx demo --output-dir" in last
    step = int(last.split(" at step ")[1].split()[0])
    assert 1 <= step < 300 and (out / "diffusion" / f"checkpoint-{step}").is_dir()

    again = subprocess.run(demo_command(out), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out / 'diffusion' / f'checkpoint-{step}'}" in again.stderr
    assert "finished at step 3; nothing to do" in again.stderr  # the evaluator is not trained again
    assert json.loads((out / "diffusion" / "results.json").read_text())["step"] == 300
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "results.json").is_file()


@pytest.mark.parametrize(("env", "load", "requested", "expected"), [
    ({}, 1.6, None, 1),  # a 2-core machine running another job: one thread, not torch's two
    ({}, 0.1, None, 1),  # rounding down: with 1.9 idle cores, one thread
    ({"OMP_NUM_THREADS": "2"}, 1.6, None, 2),  # the user's setting wins
    ({}, 1.6, 3, 3),  # and --threads wins over everything
    ({"LOCAL_WORLD_SIZE": "2"}, 0.0, None, 1),  # two processes of a launcher share the cores
])
def test_the_thread_count_fits_a_busy_two_core_machine(monkeypatch, env, load, requested, expected):
    from hfx.cli import choose_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert choose_threads(requested)[0] == expected

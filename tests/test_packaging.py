"""The wheel, installed into a fresh virtual environment, carries the CLI, recipes and card templates."""

from __future__ import annotations

import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_finds_its_resources(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(wheels), str(REPO)],
        check=True, timeout=300,
    )
    (wheel,) = wheels.glob("hfx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped_recipes = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "training").rglob("*") if p.is_file())
    assert shipped_recipes, "training/ is empty"
    for rel in shipped_recipes:
        assert f"hfx/_resources/{rel}" in names
    assert any(n.startswith("hfx/_resources/hub_cards/") for n in names)

    # A fresh environment that sees the dependencies installed here, but not this checkout.
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    env_site = next((env_dir / "lib").glob("python*/site-packages"))
    (env_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    py = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--quiet", str(wheel)],
                   check=True, timeout=300)

    recipes = sorted(p.stem for p in (REPO / "training" / "configs").glob("*.yaml"))
    assert recipes, "training/configs holds no recipe"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    probe = (
        "import hfx, hfx.resources as r; print(hfx.__file__); "
        "print(r.resource_dir('training')); print(r.resource_path('hub_cards', 'model.md')); "
        f"[print(r.training_config(name)) for name in {recipes!r}]"
    )
    out = subprocess.run([str(py), "-c", probe], cwd=outside, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert all(line.startswith(str(env_site)) for line in lines), lines  # the wheel's copy, not the checkout
    help_out = subprocess.run([str(env_dir / "bin" / "hfx"), "--help"], cwd=outside, capture_output=True, text=True,
                              timeout=300)
    assert help_out.returncode == 0, help_out.stderr
    assert "env" in help_out.stdout

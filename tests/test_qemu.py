"""Smoke test on a real OpenWrt x86-64 image under QEMU (qemu/run.sh); needs an image path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("BITMESH_OPENWRT_IMAGE", "")

pytestmark = pytest.mark.openwrt


def test_run_sh_is_valid_shell():
    subprocess.run(["bash", "-n", str(ROOT / "qemu" / "run.sh")], check=True)


@pytest.mark.skipif(not IMAGE, reason="BITMESH_OPENWRT_IMAGE is not set: no OpenWrt x86-64 image to boot")
def test_openwrt_image_runs_bitmesh():
    subprocess.run([sys.executable, str(ROOT / "tools" / "ipk.py"), "--out", str(ROOT / "dist")], check=True)
    out = subprocess.run([str(ROOT / "qemu" / "run.sh"), IMAGE], cwd=ROOT, capture_output=True, text=True,
                         timeout=3600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "qemu: PASSED" in out.stdout, out.stdout + out.stderr


def test_without_image_it_skips_with_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITMESH_OPENWRT_")}
    out = subprocess.run([str(ROOT / "qemu" / "run.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qemu: SKIPPED: ") and "image" in lines[0]

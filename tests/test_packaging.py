"""The built wheel carries the shipped data and installs only under ``neuroshard``."""

import shutil
import subprocess
import sys
import zipfile

import pytest


@pytest.mark.slow
def test_wheel_ships_data_and_one_namespace(tmp_path):
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    # Build from a copy without build/ or .venv: setuptools reuses a stale build/lib.
    root = tmp_path / "src"
    shutil.copytree(
        repo,
        root,
        ignore=shutil.ignore_patterns(".venv", "build", "dist", "*.egg-info", ".git", "runs"),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(root),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("neuroshard-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"neuroshard"}
    assert "neuroshard/data/tables/pool.json" in names
    assert any(n.startswith("neuroshard/data/models/") and n.endswith("meta.json") for n in names)
    assert not any("/datasets/" in n for n in names), "measured datasets stay out of the wheel"
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = (
        "import neuroshard, neuroshard.planner, neuroshard.models as m;"
        "import neuroshard.pretrain.pool as pool;"
        "assert str(tmp) in neuroshard.__file__, neuroshard.__file__;"
        "assert len(pool.load_pool('test')) > 0; assert m.shipped_models(); print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", f"tmp={str(tmp_path / 'site')!r};" + code],
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"

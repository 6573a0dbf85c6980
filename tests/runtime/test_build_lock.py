"""A torch extension build killed part way leaves its `lock`: recognised as stale and cleared, never
waited on; a live build's lock is left alone. Then a ZeRO-3 run over exactly what a killed build of
DeepSpeed's shared-memory op leaves (object files, no .so, the lock) trains."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from launcher.runtime.build_lock import LOCK, QUIET_S, clear_stale_lock, lock_holders, stale_lock
from tests.helpers import TINY, TWO_RANKS, ftl, ftl_env

BUILD = textwrap.dedent("""
    import sys
    from torch.utils.cpp_extension import load_inline
    load_inline(name="ftl_lock_probe", cpp_sources="int ftl_probe() { return 1; }", functions=["ftl_probe"],
                build_directory=sys.argv[1])
""")


def test_a_live_builds_lock_is_kept_and_a_killed_builds_lock_is_cleared(tmp_path: Path) -> None:
    build_dir = tmp_path / "ftl_lock_probe"
    build_dir.mkdir()
    builder = subprocess.Popen(
        [sys.executable, "-c", BUILD, str(build_dir)], env=ftl_env(), start_new_session=True, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not (build_dir / LOCK).exists():  # torch takes the lock, then writes build.ninja and compiles
        assert builder.poll() is None and time.monotonic() < deadline, builder.stderr.read() if builder.stderr else ""
        time.sleep(0.05)
    try:
        assert lock_holders(build_dir / LOCK) == [builder.pid]
        assert stale_lock(build_dir, quiet_s=0) is None  # held: a build is under way, whatever its age
        said: list[str] = []
        assert not clear_stale_lock(build_dir, said.append, quiet_s=0) and said == []
    finally:
        os.killpg(builder.pid, signal.SIGKILL)  # the build, with its ninja and compiler
        builder.wait()
    lock = build_dir / LOCK
    assert lock.exists() and lock_holders(lock) == []
    assert stale_lock(build_dir) is None  # just killed: a builder on another node might still be writing here
    later = time.time() + 600
    assert "nothing in its build dir has changed for" in (stale_lock(build_dir, now=later) or "")
    said = []
    assert clear_stale_lock(build_dir, said.append, quiet_s=0)
    assert not lock.exists()
    assert "ftl did not create it" in said[0]
    assert said[1] == f"ftl: cleared a stale build lock left by a killed build: {lock}"
    assert sorted(p.name for p in build_dir.iterdir())  # the rest of the build dir is left as it was


def test_zero3_trains_over_the_lock_and_object_files_a_killed_shm_op_build_left(tmp_path: Path) -> None:
    """What the issue's user had: an interrupted first ZeRO run left `lock` beside the object files
    of deepspeed_shm_comm and no .so; every later run waited on it in silence."""
    built = Path(ftl_env()["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm"
    ext = tmp_path / "torch_extensions"
    if not (built / "deepspeed_shm_comm.so").exists():  # the suite's shared cache has it after one DeepSpeed run
        ftl("train", *TINY, *TWO_RANKS, "strategy=zero3", "train.max_steps=1", f"run.dir={tmp_path / 'first'}")
    left = ext / "deepspeed_shm_comm"
    shutil.copytree(built, left)
    (left / "deepspeed_shm_comm.so").unlink()
    (left / LOCK).touch()
    killed_at = (left / ".ninja_log").stat().st_mtime  # copied with its times: ninja relinks, compiles nothing
    os.utime(left / LOCK, (killed_at, killed_at))
    if time.time() - killed_at < 2 * QUIET_S:  # built minutes ago by this session: age it as an earlier run's
        for path in left.iterdir():
            os.utime(path, (path.stat().st_atime - 2 * QUIET_S, path.stat().st_mtime - 2 * QUIET_S))
    proc = ftl(
        "train",
        *TINY,
        *TWO_RANKS,
        "strategy=zero3",
        "train.max_steps=2",
        f"run.dir={tmp_path / 'run'}",
        env=ftl_env(TORCH_EXTENSIONS_DIR=str(ext)),
        timeout=600,
    )
    assert f"ftl: cleared a stale build lock left by a killed build: {left / LOCK}" in proc.stderr
    assert "ftl: DeepSpeed op deepspeed_shm_comm (built on first use, then cached): " in proc.stderr
    assert (left / "deepspeed_shm_comm.so").exists() and not (left / LOCK).exists()

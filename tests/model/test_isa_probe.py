"""launcher/model/isa_probe.py: inductor's CPU vector-ISA probe is remembered after a clean pass,
reused only for the same fingerprint, never over a user's setting, and a reused verdict gives
inductor the ISAs its own probes find."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch._inductor import config  # noqa: E402

from launcher.model import isa_probe  # noqa: E402

pytestmark = pytest.mark.skipif(
    isa_probe.fingerprint() is None, reason="the verdict is kept on x86-64 Linux with a C++ compiler only"
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def inductor_default() -> None:
    with config.patch({"cpp.vec_isa_ok": None}):
        yield


def test_a_clean_pass_is_recorded_then_reused(tmp_path: Path) -> None:
    assert isa_probe.reuse_isa_probe(tmp_path) == "recorded"
    assert config.cpp.vec_isa_ok is True  # after probing as inductor does: the same cache key as later runs
    config.cpp.vec_isa_ok = None
    (verdict,) = tmp_path.glob(f"{isa_probe.VERDICT_PREFIX}*.json")
    stored = json.loads(verdict.read_text())
    assert stored["passed"] == stored["fingerprint"]["allowed"] and stored["passed"]
    assert isa_probe.reuse_isa_probe(tmp_path) == "reused"
    assert config.cpp.vec_isa_ok is True
    assert [p.name for p in tmp_path.iterdir()] == [verdict.name]  # one file, no temporaries left


def test_another_fingerprint_or_a_tampered_verdict_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isa_probe.reuse_isa_probe(tmp_path) == "recorded"
    config.cpp.vec_isa_ok = None  # a new process
    real = isa_probe.fingerprint()
    monkeypatch.setattr(isa_probe, "fingerprint", lambda: {**real, "compiler": "g++ 99"})
    config.cpp.vec_isa_ok = None
    assert isa_probe.reuse_isa_probe(tmp_path) == "recorded"  # a new compiler: probed again, its own file
    config.cpp.vec_isa_ok = None
    assert len(list(tmp_path.glob(f"{isa_probe.VERDICT_PREFIX}*.json"))) == 2
    monkeypatch.setattr(isa_probe, "fingerprint", lambda: real)
    path = isa_probe.verdict_path(tmp_path, real)
    stored = json.loads(path.read_text())
    tampered = json.dumps({**stored, "passed": stored["passed"][1:]})  # a verdict that is not a clean pass
    for text in (tampered, "{not json"):
        path.write_text(text)
        assert isa_probe.reuse_isa_probe(tmp_path) == "probed"
        assert config.cpp.vec_isa_ok is None, "not trusted"
        assert path.read_text() == text, "not ftl's verdict: left alone"


def test_a_failed_probe_is_not_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor import cpu_vec_isa

    passed = cpu_vec_isa.valid_vec_isa_list()
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", lambda: passed[1:])  # the best ISA failed its probe
    assert isa_probe.reuse_isa_probe(tmp_path) == "probed"
    assert config.cpp.vec_isa_ok is None  # inductor's own answer stands
    assert not list(tmp_path.iterdir())


def test_the_users_setting_wins(tmp_path: Path) -> None:
    with config.patch({"cpp.vec_isa_ok": False}):
        assert isa_probe.reuse_isa_probe(tmp_path) == "user"
        assert config.cpp.vec_isa_ok is False
    assert not list(tmp_path.iterdir())


def test_a_reused_verdict_gives_inductor_the_isas_its_probes_find(tmp_path: Path) -> None:
    """Fresh processes (inductor keeps its answer per process): the first probes and records, the
    second reuses; both end with the same ISA list and inductor's pick."""
    code = (
        "import sys; from pathlib import Path; from launcher.model.isa_probe import reuse_isa_probe;"
        "from torch._inductor import cpu_vec_isa as m;"
        "how = reuse_isa_probe(Path(sys.argv[1]));"
        "print(how, [str(i) for i in m.valid_vec_isa_list()], str(m.pick_vec_isa()))"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split(" ", 1)
        for _ in range(2)
    ]
    assert [how for how, _ in runs] == ["recorded", "reused"]
    assert runs[0][1] == runs[1][1]


def test_compiling_for_the_cpu_reuses_the_probe_and_nothing_else_does(monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import tiny
    from transformers import AutoTokenizer

    from launcher.model import compile as compile_mod
    from launcher.paths import asset

    calls: list[str] = []
    # compile.py imports the probe when it compiles (it keeps torch out of `ftl plan`): patch it at its source
    monkeypatch.setattr(isa_probe, "reuse_isa_probe", lambda: calls.append("probe") or "reused")
    tok = AutoTokenizer.from_pretrained(asset("tiny-tokenizer"))
    compile_mod.compile_decoder_layers(tiny(tok, "sdpa_varlen"), torch.device("cpu"))
    assert calls == ["probe"]
    compile_mod.compile_decoder_layers(tiny(tok, "sdpa_varlen"), torch.device("meta"))
    compile_mod.compile_decoder_layers(tiny(tok, "sdpa_varlen"))
    assert calls == ["probe"], "only a CPU device"

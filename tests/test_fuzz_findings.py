"""Findings on disk, traces, replay, the atheris entry point's callback and
the runner's stats parsing (the planted-bug test runs the whole pipeline)."""

from __future__ import annotations

import json

import pytest
from conftest import get_build

import fuzz.findings as findings
from conformance.compare import triage
from conformance.compare.diff import compare
from conformance.compare.target import target_for
from conformance.compare.trace import MARK, trace
from fuzz.decode import decode
from fuzz.entry import DivergenceFound, Fuzzer
from fuzz.findings import iter_findings, load_finding, needs_sanitizer, save_finding
from fuzz.minimize import minimize, replay, signature_predicate
from fuzz.runner import _STATS
from reference.program import parse_program

PROGRAM = """\
page_shift 12
ram 0x0 0x100000
numa 0x0 0
numa 0x100 1
numa 0x180 0
---
preserve_folio 0x1000 3
preserve_pages 0x0 0x200
add_subtree t1 0x40004000 0x100
kexec
restore_folio 0x1000000
retrieve_subtree t1
"""


@pytest.fixture(scope="module")
def target():
    return target_for(get_build("7.2", 12))


@pytest.fixture
def unknown(monkeypatch):
    """Nothing is a known finding (corpus/known/ changes as bugs are triaged)."""
    monkeypatch.setattr(triage, "load_known", lambda directory=None: ())


@pytest.fixture
def diverging(target):
    c = compare(parse_program(PROGRAM), target)
    assert c.first is not None
    return c


def test_save_load_and_dedupe(tmp_path, target, diverging, unknown):
    small = minimize(diverging.program, signature_predicate(target, diverging.first.signature), 100)
    path = save_finding(tmp_path, small, diverging, target, b"\x01\x02")
    assert path == tmp_path / diverging.first.signature
    assert {p.name for p in path.iterdir()} == {"program.txt", "original.txt", "input.bin", "finding.json", "trace.txt"}
    assert parse_program((path / "program.txt").read_text()) == small
    assert parse_program((path / "original.txt").read_text()) == diverging.program
    assert (path / "input.bin").read_bytes() == b"\x01\x02"
    meta = load_finding(path)
    assert meta["signature"] == meta["first"]["signature"] == diverging.first.signature
    assert meta["kernel_version"] == target.build.source.version and meta["page_shift"] == 12
    assert meta["flavor"] == "plain" and meta["source"]["files"] and meta["created"]
    assert meta["divergences"] and meta["ops"] == len(small.steps) < meta["original_ops"]
    assert MARK in (path / "trace.txt").read_text()
    assert list(iter_findings(tmp_path)) == [path]
    # the same signature again: left untouched
    assert save_finding(tmp_path, diverging.program, diverging, target) is None
    assert parse_program((path / "program.txt").read_text()) == small
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_known_findings_are_not_saved(tmp_path, target, diverging, monkeypatch):
    monkeypatch.setattr(findings, "triage", lambda cmp, target, attribute=True: triage.Verdict("known", cmp.first))
    assert save_finding(tmp_path, diverging.program, diverging, target) is None
    assert not list(tmp_path.iterdir())


def test_iter_findings_skips_incomplete(tmp_path):
    (tmp_path / ".abc.tmp").mkdir()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "program.txt").write_text("---\n")
    assert list(iter_findings(tmp_path)) == []
    assert list(iter_findings(tmp_path / "missing")) == []


def test_trace_is_side_by_side(target, diverging):
    text = trace(diverging, target)
    lines = text.splitlines()
    assert lines[0].startswith("kernel 7.2")
    marked = [ln for ln in lines if MARK in ln]
    assert len(marked) == 1 and diverging.first.op in marked[0]
    for step in diverging.program.steps:
        assert any(step.text() in ln and "rc=" in ln for ln in lines)
    assert "divergences (" in text and "next kernel:" in text and "model:" in text


@pytest.mark.parametrize("as_json", [False, True])
def test_replay_text_finding_and_bytes(tmp_path, target, diverging, unknown, as_json):
    src = tmp_path / "p.txt"
    src.write_text(PROGRAM)
    out, diverged = replay(src, target, as_json=as_json)
    assert diverged
    if as_json:
        assert json.loads(out)["divergences"][0]["signature"] == diverging.first.signature
    else:
        assert MARK in out
    path = save_finding(tmp_path / "crashes", diverging.program, diverging, target, b"")
    out, diverged = replay(path, target, as_json=as_json)
    assert diverged and ("reproduced" in out)
    raw = tmp_path / "in.bin"
    raw.write_bytes(b"")
    out, diverged = replay(raw, target)
    assert "kexec" in out


def test_needs_sanitizer():
    base = {"flavor": "fuzz", "events": ["undefined behaviour trap at kho_preserve_pages kexec_handover.c:?"]}
    assert needs_sanitizer(base)
    assert not needs_sanitizer({**base, "flavor": "plain"})
    assert not needs_sanitizer({**base, "events": ["fault: Segmentation fault at 0 (phys 0x1), outside the arena"]})
    assert not needs_sanitizer({**base, "events": []})


def test_entry_callback_saves_once_and_never_raises(tmp_path, target, unknown, monkeypatch):
    program = parse_program(PROGRAM)
    monkeypatch.setattr("fuzz.entry.decode", lambda data, page_shift: program)
    fuzzer = Fuzzer(target, tmp_path, minimize_runs=60)
    fuzzer(b"x")
    fuzzer(b"y")  # same signature: handled once
    (saved,) = iter_findings(tmp_path)
    assert list(tmp_path.iterdir()) == [saved]  # no scratch directory left
    assert (saved / "input.bin").read_bytes() == b"x"
    assert len(parse_program((saved / "program.txt").read_text()).steps) < len(program.steps)
    # without a crashes dir a new divergence is a libFuzzer crash (ClusterFuzzLite)
    with pytest.raises(DivergenceFound, match="first divergence"):
        Fuzzer(target, None, 10)(b"x")


def test_native_callback_on_passing_input(tmp_path, target, unknown):
    fuzzer = Fuzzer(target, tmp_path, 10)
    fuzzer(bytes(8))  # decode(zeros): a kexec-only program; both agree
    assert decode(bytes(8), 12).steps and not list(tmp_path.iterdir())


def test_stats_lines():
    inproc = "#18017\tREDUCE cov: 646 ft: 3092 corp: 272/3524b lim: 17 exec/s: 621 rss: 491Mb L: 12/17 MS: 1 EraseBytes-"
    assert _STATS.match(inproc).groups() == ("18017", "646", "3092", "272", "621")
    assert _STATS.match("#2\tINITED cov: 5 ft: 6 corp: 1/1b exec/s: 0 rss: 40Mb").groups() == ("2", "5", "6", "1", "0")
    assert not _STATS.match("INFO: Seed: 1")

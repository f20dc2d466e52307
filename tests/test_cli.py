"""The command line as a user meets it: every bad file or flag gets one line
on stderr naming the file and the fix, exit status 2, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, child_env

CRASHES = REPO / "corpus" / "crashes"
A_FINDING = sorted(p for p in CRASHES.iterdir() if (p / "finding.json").is_file())[0]

# The CLI with the corpus (known records) read from another directory.
_WITH_CORPUS = r"""
import sys
from pathlib import Path
import conformance.corpus
conformance.corpus._CHECKOUT_CORPUS = Path(sys.argv[1])
from conformance.cli import main
sys.exit(main(sys.argv[2:]))
"""


def cli(*args: str | Path, corpus: Path | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    prefix = ["-c", _WITH_CORPUS, str(corpus)] if corpus else ["-m", "conformance.cli"]
    return subprocess.run([sys.executable, *prefix, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=child_env(), timeout=120)


def one_line_error(proc: subprocess.CompletedProcess, *names: str | Path) -> str:
    """The error line, after checking it is the only output and names ``names``."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and not proc.stdout, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def finding(tmp_path):
    """A copy of a saved finding, to damage."""
    return Path(shutil.copytree(A_FINDING, tmp_path / A_FINDING.name))


@pytest.mark.parametrize("command", ["replay", "minimize"])
def test_not_a_finding_directory(command, tmp_path):
    (tmp_path / "program.txt").write_text("---\n")
    line = one_line_error(cli(command, tmp_path), tmp_path)
    assert "not a finding directory" in line


@pytest.mark.parametrize("command", ["replay", "minimize"])
def test_truncated_finding_json(command, finding):
    meta = finding / "finding.json"
    meta.write_text(meta.read_text()[:100])
    line = one_line_error(cli(command, finding), meta)
    assert "damaged" in line and "delete the directory" in line


@pytest.mark.parametrize("command", ["replay", "minimize"])
def test_finding_json_without_what_replay_needs(command, finding):
    meta = finding / "finding.json"
    data = json.loads(meta.read_text())
    del data["flavor"]
    meta.write_text(json.dumps(data))
    assert "'flavor' is missing" in one_line_error(cli(command, finding), meta)
    meta.write_text("[]")
    assert "not a finding record" in one_line_error(cli(command, finding), meta)


@pytest.mark.parametrize("command", ["replay", "minimize"])
def test_finding_json_with_a_damaged_next_kernel(command, finding):
    meta = finding / "finding.json"
    data = json.loads(meta.read_text())
    data["next"] = {"kernel_version": 7}
    meta.write_text(json.dumps(data))
    assert "'next.kernel_version' is missing or not a str" in one_line_error(cli(command, finding), meta)


@pytest.mark.parametrize("command", ["replay", "minimize"])
def test_finding_without_program(command, finding):
    (finding / "program.txt").unlink()
    assert "program.txt is missing" in one_line_error(cli(command, finding), finding)


def test_bad_handover_flags(tmp_path):
    program = tmp_path / "p.txt"
    program.write_text("page_shift 12\n---\nkexec\n")
    one_line_error(cli("replay", program, "--handover-to", "banana"), "banana")
    one_line_error(cli("replay", program, "--handover-to", "7.3", "--handover-from", "7.2"), "--handover-from", "--help")
    one_line_error(cli("check", "--handover-with", "banana", "--out", tmp_path / "out"), "banana")
    assert not (tmp_path / "out").exists()


def test_replay_of_a_missing_file(tmp_path):
    one_line_error(cli("replay", tmp_path / "nope.txt"), tmp_path / "nope.txt")


@pytest.mark.parametrize("content", ["", '{"title": "x", "cells": [', "{}", "[]", '{"title": "t", "created": "c", '
                                     '"tool_version": "v", "cells": [{"kernel": "7.2", "page_shift": 12, "flavor": "plain", '
                                     '"checks": [{"name": "a", "status": "maybe"}]}]}'])
def test_bad_report(content, tmp_path):
    report = tmp_path / "report.json"
    report.write_text(content)
    assert "check --out DIR" in one_line_error(cli("report", report, "--out", tmp_path / "out"), report)
    assert not (tmp_path / "out").exists()


def test_missing_report(tmp_path):
    assert "no such file" in one_line_error(cli("report", tmp_path / "report.json"), tmp_path / "report.json")


def test_corpus_dir_that_is_a_file(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.write_text("")
    line = one_line_error(cli("fuzz", "--kernel", "7.2", "--time", "5", "--crashes", tmp_path / "crashes", corpus), corpus)
    assert "give a directory" in line
    crashes = tmp_path / "crashes-file"
    crashes.write_text("")
    one_line_error(cli("fuzz", "--kernel", "7.2", "--crashes", crashes, tmp_path / "c2"), crashes, "--crashes")


@pytest.mark.parametrize("flag,value", [("--jobs", "0"), ("--jobs", "-3"), ("--time", "0"), ("--time", "-1"),
                                        ("--time", "ten")])
def test_bad_fuzz_flags(flag, value, tmp_path):
    line = one_line_error(cli("fuzz", flag, value, tmp_path / "corpus"), flag)
    assert "--help" in line
    assert not (tmp_path / "corpus").exists()


@pytest.mark.parametrize("record,problem", [
    ('id = "x"\ntitle = "unterminated\n', "line 2"),
    ('id = "x"\nkind = "kernel-bug"\n', "no key 'title'"),
    ('id = "x"\ntitle = "t"\nkind = "kernel-bug"\naffected = 7\ndescription = "d"\nwhy_model_is_right = "w"\n', "not iterable"),
    ('id = "x"\ntitle = "t"\nkind = "k"\naffected = []\ndescription = "d"\nwhy_model_is_right = "w"\n', "zz-broken.toml:3: kind 'k'"),
    ('id = "x"\ntitle = "t"\nkind = "kernel-bug"\naffected = []\nquirks = ["no-such"]\ndescription = "d"\nwhy_model_is_right = "w"\n',
     "no model quirk no-such"),
])
def test_broken_known_record_is_named_on_the_terminal(record, problem, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(REPO / "corpus" / "known", corpus / "known")
    bad = corpus / "known" / "zz-broken.toml"
    bad.write_text(record)
    for command in (["check", "--kernel", "7.2", "--page-shift", "12", "--flavor", "plain", "--out", tmp_path / "out"],
                    ["fuzz", "--kernel", "7.2", "--time", "5", tmp_path / "corpus-dir"]):
        line = one_line_error(cli(*command, corpus=corpus), bad)
        assert problem in line and "fix or remove it" in line

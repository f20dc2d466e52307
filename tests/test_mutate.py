"""kho-conform mutate: mutants generated from pycparser's AST of the
functions the harness reaches in a real cached kernel (7.2), applied to the
file's text; a tiny run (one killed, one that does not build, one
survivor), resumed; --functions and --patch; an interrupted run leaves
nothing behind; the report's mutation section in every format.

No kernel text is in this file: mutants are picked by function, operator
kind and description.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace

import pytest
from conftest import REPO, child_env
from planted import UNPRESERVE_KEEPS_BIT, planted_source

from conformance import processes
from conformance.errors import KhoConformError
from conformance.mutate import KINDS, Settings, generate, plan, run_mutation
from conformance.mutate.mutants import Mutant, apply, diff, kernel_text
from conformance.mutate.runner import STATE, load_state, run_key
from conformance.native.build import build
from conformance.report import MutantResult, MutationResult, Report, load_report, write_report
from conformance.report.email import render_email
from conformance.report.junit import render_junit
from conformance.report.markdown import render_markdown
from conformance.source import cache_dir, fetch

FAST = Settings(page_shift=12, fuzz_inputs=3, jobs=2)


@pytest.fixture(scope="module")
def source():
    return fetch("7.2")


@pytest.fixture(scope="module")
def generated(source):
    return generate(build(source, 12))


def pick(generated, function: str, kind: str, description: str) -> Mutant:
    """The first mutant (in file order) of ``function`` with that operator and change."""
    return next(m for m in generated.mutants if (m.function, m.kind, m.description) == (function, kind, description))


def test_every_operator_generates_mutants_of_the_reached_functions(generated):
    kinds = Counter(m.kind for m in generated.mutants)
    assert set(kinds) == set(KINDS), kinds
    assert len(generated.mutants) >= 300
    # Every function's statements were placed, but those of the functions
    # whose macros expand to GNU statement expressions (operators still apply).
    assert all(u.endswith("(a GNU statement expression among its statements)") for u in generated.unplaced), generated.unplaced
    assert {u.split()[0] for u in generated.unplaced} <= {"new_vmalloc_chunk", "kho_preserve_vmalloc"}
    assert {"kho_radix_add_page", "kho_radix_del_page", "kho_preserve_pages", "kho_restore_pages",
            "kho_add_subtree", "kho_init"} <= {m.function for m in generated.mutants}
    assert {m.function for m in generated.mutants} <= set(generated.functions)


def test_generation_is_deterministic(source, generated):
    again = generate(build(source, 12))
    assert again.mutants == generated.mutants
    assert len({m.id for m in generated.mutants}) == len(generated.mutants)
    assert all(Mutant.from_json(json.loads(json.dumps(m.to_json()))) == m for m in generated.mutants)


def test_every_mutant_applies_inside_its_function_and_changes_what_it_says(source, generated):
    text = kernel_text(source.root)
    lines = text.split("\n")
    spans = {names: (first, last) for names, first, last in build(source, 12).kept}
    operators = re.compile(r"'(\S+)' -> '(\S+)'$")
    for m in generated.mutants:
        new = apply(text, m.edits)
        assert new != text, m.name
        first, last = spans[m.function]
        assert all(first <= n <= last for n in m.lines), m.name
        if m.kind != "swap-branches":  # line numbers stay the kernel's
            assert new.count("\n") == text.count("\n"), m.name
        hunks = diff(text, m).splitlines()
        assert hunks[0] == "--- a/kernel/liveupdate/kexec_handover.c" and hunks[2].startswith("@@"), m.name
        assert all(h[0] in "-+@" for h in hunks), m.name  # only the mutated lines, no context
        swapped = operators.match(m.description)
        if m.kind in ("relational", "logical", "arithmetic", "bitwise", "shift") and swapped:
            # the AST placed the edit on the operator itself, not on a macro's
            (e,) = m.edits
            assert lines[e.line - 1][e.col - 1 : e.end_col - 1] == swapped[1], m.name
            assert e.text == swapped[2], m.name


def test_functions_and_patched_lines_select_mutants(source, generated, tmp_path):
    p = plan(source, FAST, tmp_path, ["kho_radix_del_page"])
    assert p.functions == ["kho_radix_del_page"]
    assert [m.id for m in p.mutants] == [m.id for m in generated.mutants if m.function == "kho_radix_del_page"]
    with pytest.raises(KhoConformError, match=r"^--functions no_such_function: not a function the harness reaches .*"
                                              r"choose from .*kho_radix_add_page"):
        plan(source, FAST, tmp_path, ["no_such_function"])
    patched = planted_source(tmp_path, "7.2", UNPRESERVE_KEEPS_BIT)  # one line of the radix delete removed
    (changed,) = patched.changed_lines.values()
    p = plan(patched, FAST, tmp_path / "patched")
    wanted = {n for a, b in changed for n in range(a, b + 1)}
    assert p.lines == changed
    assert p.mutants and len(p.mutants) < 10
    assert all(m.lines & wanted for m in p.mutants)


def test_a_tiny_run_kills_fails_to_build_survives_and_resumes(source, generated, tmp_path):
    killed = pick(generated, "kho_radix_add_page", "relational", "'>' -> '<='")  # the descent never runs
    broken = pick(generated, "kho_radix_add_page", "constant", "0 -> 1")  # a pointer array's initializer: no build
    survivor = pick(generated, "kho_radix_del_page", "int-type", "'unsigned int' -> 'unsigned long'")  # a wider counter
    out = tmp_path / "out"
    base = plan(source, FAST, out, ["kho_radix_add_page", "kho_radix_del_page"])
    seen: list[str] = []
    result = run_mutation(source, FAST, out, replace(base, mutants=[killed, broken, survivor]), lambda r: seen.append(r.id))
    by_id = {r.id: r for r in result.mutants}
    assert sorted(seen) == sorted([killed.id, broken.id, survivor.id])
    assert by_id[killed.id].status == "killed" and by_id[killed.id].check.startswith("scenario."), by_id[killed.id]
    assert by_id[broken.id].status == "did-not-build" and "compiling" in by_id[broken.id].detail
    s = by_id[survivor.id]
    assert s.status == "survived", s
    assert s.diff == diff(kernel_text(source.root), survivor) and s.changed == []
    assert result.counts() == {"killed": 1, "survived": 1, "did-not-build": 1, "timed-out": 0}
    assert result.score() == 0.5 and result.median_kill_seconds() == by_id[killed.id].seconds

    # Resumed: what is recorded is not run again.
    records = (out / STATE).read_text().splitlines()
    assert len(records) == 4 and "run" in json.loads(records[0])
    more = pick(generated, "kho_radix_del_page", "drop-call", next(m.description for m in generated.mutants
                                                                 if (m.function, m.kind) == ("kho_radix_del_page", "drop-call")))
    again = plan(source, FAST, out, ["kho_radix_add_page", "kho_radix_del_page"])
    assert set(again.done) == {killed.id, broken.id, survivor.id}
    seen.clear()
    result = run_mutation(source, FAST, out, replace(again, mutants=[killed, broken, survivor, more]), lambda r: seen.append(r.id))
    assert seen == [more.id] and len(result.mutants) == 4
    assert {r.id: r for r in result.mutants}[survivor.id] == s
    assert {r.id: r for r in result.mutants}[more.id].status == "killed"  # the leaf bit is never cleared

    # Another budget is another run: refused in one line, naming what differs.
    with pytest.raises(KhoConformError, match=r"holds a run with another fuzz_inputs .* pass another --out"):
        load_state(out / STATE, run_key(source, replace(FAST, fuzz_inputs=4)))

    report = Report("mutation", "now", "test", [], mutation=[result])
    paths = write_report(report, tmp_path / "report")
    assert load_report(paths["json"]).mutation == [result]
    assert survivor.name in paths["markdown"].read_text() and survivor.name in paths["html"].read_text()


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_an_interrupted_run_leaves_nothing_and_keeps_its_results(source, tmp_path, how):
    """Ctrl-C, or SIGKILL (its watchdog cleans up), while workers build and
    run mutants: no process and no scratch directory is left; every
    recorded result is whole and a new run resumes from it."""
    out = tmp_path / "out"
    token = f"mutate-{how}"
    env = {**child_env(), processes.GUARDS_ENV: processes.with_token(child_env().get(processes.GUARDS_ENV, ""), token)}
    cmd = [sys.executable, "-m", "conformance.cli", "mutate", "--kernel", "7.2", "--functions", "kho_radix_add_page",
           "--jobs", "2", "--fuzz-inputs", "3", "--out", str(out)]
    before = set((cache_dir() / "mutants").glob("run-*"))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / STATE
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not state.is_file() or len(state.read_text().splitlines()) < 2):
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(getattr(signal, how))
    rc = proc.wait(60)
    err = proc.stderr.read().decode()
    assert rc == (130 if how == "SIGINT" else -9), err[-2000:]
    if how == "SIGINT":
        assert "interrupted" in err
    deadline = time.monotonic() + 10
    while processes.tagged(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes.tagged(token)
    assert set((cache_dir() / "mutants").glob("run-*")) <= before  # scratch trees and builds are gone
    records = [json.loads(line) for line in state.read_text().splitlines()[1:] if line.endswith("}")]
    assert records and all(MutantResult(**r) for r in records)
    resumed = plan(source, FAST, out, ["kho_radix_add_page"])
    assert set(resumed.done) >= {r["id"] for r in records}


def test_the_report_shows_the_mutation_section_in_every_format(tmp_path):
    mutants = [MutantResult("a1", "f", 10, "relational", "'<' -> '<='", "killed", "scenario.x", "[ops] op 1", 2.0),
               MutantResult("b2", "f", 12, "constant", "0 -> 1", "survived", diff="--- a/x\n+++ b/x\n@@ -12 +12 @@\n-0\n+1\n",
                            changed=["scenario.y: next.walk"]),
               MutantResult("c3", "g", 20, "int-type", "'int' -> 'long'", "did-not-build", detail="compiling failed"),
               MutantResult("d4", "g", 22, "arithmetic", "'++' -> '--'", "timed-out", detail="over the 9 s budget", seconds=9.0),
               MutantResult("e5", "g", 23, "drop-call", "removed: x", "killed", "fuzz.random:3", "[tree] boot", 4.0)]
    r = MutationResult("7.2.13", {"version": "7.2.13", "provider": "test", "files": {}}, 12,
                       {"fuzz_inputs": 3, "timeout": 9, "jobs": 1, "lines": [[10, 12]]}, ["f", "g"], mutants, 30.0)
    assert r.counts("g") == {"killed": 1, "survived": 0, "did-not-build": 1, "timed-out": 1}
    assert r.score() == 3 / 4 and r.score("f") == 1 / 2 and r.median_kill_seconds() == 3.0
    report = Report("mutation", "now", "test", [], mutation=[r])
    md = render_markdown(report)
    assert "## Mutation: 7.2.13 ps12" in md and "Mutation score 75.0%" in md and "| `f` | 2 | 1 | 1 | 0 | 0 | 50.0% |" in md
    assert "#### `f:12:constant:b2` 0 -&gt; 1" in md and "+1" in md and "scenario.y: next.walk" in md
    assert "lines the patch series changed: 10-12" in md and "`g:22:arithmetic:d4`" in md
    paths = write_report(report, tmp_path)
    html = paths["html"].read_text()
    assert "id='mutation'" in html and "f:12:constant:b2" in html and "median time to kill 3.0 s" in html
    junit = render_junit(report)
    assert 'name="mutation 7.2.13 ps12"' in junit and "survived: f:12:constant:b2" in junit and 'failures="0"' in junit
    assert "Mutation testing of 7.2.13, page shift 12" in render_email(report)
    assert load_report(paths["json"]).mutation == [r]
    old = json.loads(paths["json"].read_text())
    del old["mutation"]  # a report.json from before mutation testing
    paths["json"].write_text(json.dumps(old))
    assert load_report(paths["json"]).mutation == []

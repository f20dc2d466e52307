"""Documentation against code (conformance.doc), per cached kernel version:
what the KHO documentation shows is found item by item, each held to the
code's definition; the known slips are credited to their records and
nothing else differs. A tree whose documentation or code was changed here,
in tmp_path (no kernel text in the repository), fails the checks concerned.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import SERIES

from conformance.compare.triage import load_known
from conformance.doc import code_constants, doc_checks, shown
from conformance.source import fetch, from_tree
from conformance.source.tree_files import ABI_HEADER

CORE = ["doc.compatible", "doc.prop.preserved-memory-map", "doc.prop.preserved-data", "doc.prop.blob-size",
        "doc.ref.KHO_FDT_COMPATIBLE", "doc.const.depth.ps12", "doc.const.root-level.ps12", "doc.const.pfn-bits.ps12",
        "doc.const.bitmap-bits.ps12", *(f"doc.const.table-bits.lv{n}.ps12" for n in range(1, 6)),
        *(f"doc.const.order-bit.{n}.ps12" for n in range(3)), "doc.kexec-metadata.entry.kexec-metadata",
        "doc.memblock.entry.memblock", "doc.memblock.compatible.memblock", "doc.memblock.compatible.reserve-mem",
        "doc.section.kexec_handover.h:kho-persistent-memory-tracker", "doc.luo.entry.LUO"]
# What each version's documentation gets wrong (corpus/known/), and what no file read defines.
KNOWN = {"7.1": {"doc.luo.compatible.luo-session": "doc-luo-session-compatible-stale",
                 "doc.luo.ref.LUO_SESSION_COMPATIBLE": "doc-luo-session-compatible-name"},
         "7.2": {"doc.compatible": "doc-compatible-stale"}, "7.3": {"doc.compatible": "doc-compatible-stale"}}
SKIPPED = {"doc.memblock.node.n1", "doc.memblock.prop.start", "doc.memblock.prop.size"}


@pytest.fixture(scope="module")
def results():
    return {series: {r.name: r for r in doc_checks(fetch(series))} for series in SERIES}


@pytest.mark.parametrize("series", SERIES)
def test_every_documented_item_is_held_to_the_code(series, results):
    checks = results[series]
    assert set(CORE) <= set(checks), sorted(set(CORE) - set(checks))
    assert {n: c.known_id for n, c in checks.items() if c.status == "known"} == KNOWN[series]
    assert {n for n, c in checks.items() if c.status == "skipped"} == SKIPPED
    assert all(c.status == "pass" for n, c in checks.items() if n not in KNOWN[series] and n not in SKIPPED)
    # the luo ABI changed in 7.2: its FDT nodes and their strings went with it
    assert ("doc.luo.compatible.luo-session" in checks) == (series == "7.1")
    assert ("doc.luo.ref.LUO_ABI_COMPATIBLE" in checks) == (series != "7.1")


def test_the_known_slip_shows_values_not_text(results):
    slip = results["7.3"]["doc.compatible"]
    assert slip.divergence["expected"] == "kho-v3" and slip.divergence["actual"] == "kho-v4"
    assert "kexec_handover.h:" in slip.detail


def test_documentation_records_name_checks_that_exist(results):
    for record in load_known():
        for check in record.doc_checks:
            affected = [s for s in SERIES if record.affects(fetch(s).release)]
            assert affected and all(results[s][check].status == "known" for s in affected), (record.id, check)


def _edited_tree(tmp_path, edits: dict[str, list[tuple[str, str]]]):
    root = tmp_path / "tree"
    shutil.copytree(fetch("7.3").root, root)
    for rel, replacements in edits.items():
        text = (root / rel).read_text()
        for old, new in replacements:
            assert old in text, (rel, old)
            text = text.replace(old, new)
        (root / rel).write_text(text)
    return from_tree(root)


def test_a_changed_definition_or_figure_fails_its_check(tmp_path):
    source = _edited_tree(tmp_path, {
        ABI_HEADER: [('_SIZE_PROP_NAME "blob-size"', '_SIZE_PROP_NAME "blob-length"'),  # the code renames a property
                     ("6-level hierarchy", "5-level hierarchy"),  # the text's figure goes wrong
                     ('compatible = "kho-v3"', 'compatible = "kho-v4"'),  # the stale string fixed in one of its two places
                     ("DOC: KHO persistent memory tracker", "DOC: KHO memory tracker")],  # a section renamed
    })
    checks = {r.name: r for r in doc_checks(source, constants=code_constants(fetch("7.3")))}
    prop = checks["doc.prop.blob-size"]
    assert prop.status == "fail" and prop.divergence["actual"] == "blob-length"
    assert checks["doc.const.depth.ps12"].status == "fail" and checks["doc.const.depth.ps12"].divergence["actual"] == "6"
    assert checks["doc.compatible"].status == "known"  # the other place still shows kho-v3
    assert checks["doc.section.kexec_handover.h:kho-persistent-memory-tracker"].status == "fail"
    assert checks["doc.prop.preserved-data"].status == "pass"


def test_items_are_found_with_their_place(tmp_path):
    items = [s for s in shown(fetch("7.2").root) if s.check == "doc.compatible"]
    assert [s.value for s in items] == ["kho-v3", "kho-v3"]
    assert all(s.where.startswith(f"{ABI_HEADER}:") for s in items)

"""The report as JUnit XML (``junit.xml``), for CI systems."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from ..source.identity import short_digest
from .schema import MUTANT_STATUSES, Report, clean, divergence_fields, mutation_rows, mutation_summary


def render_junit(report: Report) -> str:
    """JUnit XML for CI: known kernel bugs pass (with a note) so they do not turn the build red."""
    root = ET.Element("testsuites", name=clean(report.title))
    for c in report.cells:
        n = c.counts()
        suite = ET.SubElement(root, "testsuite", name=clean(c.name), tests=str(len(c.checks)), failures=str(n["fail"]),
                              errors=str(n["error"]), skipped=str(n["skipped"]), time=f"{sum(k.seconds for k in c.checks):.3f}")
        props = ET.SubElement(suite, "properties")
        for prefix, source in [("source", c.source)] + [("next_source", c.next_source)] * bool(c.next_kernel):
            for key in ("version", "provider"):
                ET.SubElement(props, "property", name=f"{prefix}.{key}", value=clean(source.get(key, "")))
            ET.SubElement(props, "property", name=f"{prefix}.files", value=short_digest(source))
        for k in c.checks:
            case = ET.SubElement(suite, "testcase", name=clean(k.name), classname=clean(c.name), time=f"{k.seconds:.3f}")
            d = k.divergence or {}
            body = "\n".join([f"{label}: {v}" for label, v in divergence_fields(k)]
                             + [f"expected (model): {d.get('expected', '')}", f"actual (kernel C): {d.get('actual', '')}",
                                f"reproduce: {k.reproducer}"])
            if k.status == "fail":
                el = ET.SubElement(case, "failure", message=clean(k.detail or d.get("field", "divergence")),
                                   type=clean(d.get("signature", "divergence")))
                el.text = clean(body)
            elif k.status == "error":
                ET.SubElement(case, "error", message=clean(k.detail), type="error").text = clean(k.detail)
            elif k.status == "skipped":
                ET.SubElement(case, "skipped", message=clean(k.detail))
            elif k.status == "known":
                ET.SubElement(case, "system-out").text = clean(f"known kernel bug {k.known_id}: {k.detail}\n{body}")
    for r in report.mutation:
        # A measure of the suite, not a verdict on the kernel: survivors are listed, never failures.
        suite = ET.SubElement(root, "testsuite", name=clean(f"mutation {r.kernel} ps{r.page_shift}"), tests=str(len(r.functions)),
                              failures="0", errors="0", skipped="0", time=f"{r.seconds:.3f}")
        props = ET.SubElement(suite, "properties")
        ET.SubElement(props, "property", name="mutation.summary", value=clean(mutation_summary(r)))
        for f, n, score in mutation_rows(r)[:-1]:
            case = ET.SubElement(suite, "testcase", name=clean(f), classname=clean(f"mutation {r.kernel} ps{r.page_shift}"))
            survivors = [f"survived: {m.name} {m.description}" for m in r.survivors() if m.function == f]
            ET.SubElement(case, "system-out").text = clean("\n".join([f"score {score}: " + ", ".join(
                f"{n[s]} {s}" for s in MUTANT_STATUSES), *survivors]))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"

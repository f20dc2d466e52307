"""The ``kho-conform`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.markup import escape

from reference.geometry import PAGE_SHIFTS

from . import processes
from .errors import KhoConformError
from .source.versions import DEFAULT_KERNEL

console = Console(stderr=True, soft_wrap=True)  # errors stay one line, whatever the width
out = Console(soft_wrap=True)


def _kernel_args(p: argparse.ArgumentParser, page_shift_default: int | None = 12) -> None:
    g = p.add_argument_group("kernel source (one of)")
    g.add_argument("--kernel", metavar="VERSION", help=f"Debian kernel source by version: 7.1, 7.2.13, 7.3 (default {DEFAULT_KERNEL})")
    g.add_argument("--kernel-tree", metavar="PATH", type=Path, help="a local kernel tree, used read-only")
    g.add_argument("--kernel-tarball", metavar="PATH", type=Path, help="a kernel source tarball")
    _patch_args(g)
    p.add_argument("--page-shift", type=int, choices=PAGE_SHIFTS, default=page_shift_default,
                   help="kernel PAGE_SHIFT (default: %(default)s)" if page_shift_default else "kernel PAGE_SHIFT (default: the finding's, else 12)")


def _handover_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("a live update across versions (one of)").add_mutually_exclusive_group()
    g.add_argument("--handover-to", metavar="VERSION",
                   help="the kernel above hands over to the next kernel of this released version (e.g. 7.3)")
    g.add_argument("--handover-from", metavar="VERSION",
                   help="the kernel above boots from the handover image of this released version's old kernel")


def _flavor_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flavor", choices=("plain", "asan", "fuzz"),
                   help="build flavor (default: the finding's, else plain)")


def _patch_args(g) -> None:
    g.add_argument("--patch", metavar="PATH", type=Path,
                   help="a diff, an mbox (b4 am, git format-patch --stdout) or a git format-patch directory, "
                        "applied in order to a scratch copy of the source")
    g.add_argument("--commits", metavar="A..B", help="with --kernel-tree: test the tree's git range A..B (applied to A)")


def _source(args: argparse.Namespace):
    from .source import resolve

    if getattr(args, "finding", None) and not _source_chosen(args):
        from fuzz.minimize import finding_source

        return finding_source(args.finding)
    return resolve(args.kernel, args.kernel_tree, args.kernel_tarball, args.patch, commits=args.commits)


def _source_chosen(args: argparse.Namespace) -> bool:
    return any(getattr(args, flag, None) for flag in ("kernel", "kernel_tree", "kernel_tarball", "patch", "commits"))


def _reproduce_flags(args: argparse.Namespace) -> str:
    parts = []
    for flag in ("kernel", "kernel_tree", "kernel_tarball", "patch", "commits"):
        value = getattr(args, flag, None)
        if value:
            parts.append(f"--{flag.replace('_', '-')} {value}")
    return " ".join(parts)


def _target(args: argparse.Namespace):
    """The kernel the options select, or its handover to or from another
    (``--handover-to``/``--handover-from``, or the finding's own)."""
    from .compare.target import Pair, target_for
    from .native.build import build

    main = target_for(build(_source(args), args.page_shift, args.flavor))
    partner = _partner(args)
    if partner is None:
        return main
    other = target_for(build(partner, args.page_shift, args.flavor))
    return Pair(other, main) if getattr(args, "handover_from", None) else Pair(main, other)


def _partner(args: argparse.Namespace):
    """The other kernel of a handover the options (or the finding) name, or None."""
    from .source import resolve

    version = getattr(args, "handover_to", None) or getattr(args, "handover_from", None)
    if version:
        return resolve(version, None, None, None)
    finding = getattr(args, "finding", None)
    if finding and "next" in finding:
        from fuzz.minimize import finding_next_source

        return finding_next_source(finding)
    return None


def cmd_kernel(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .source import fetch, list_available, list_cached

    if args.action == "fetch":
        for version in args.versions:
            with console.status(f"fetching kernel {version}"):
                src = fetch(version)
            out.print(f"{src.version}  {src.provider}  {src.root}")
        return 0
    table = Table(title="kernel sources")
    table.add_column("series")
    table.add_column("cached")
    table.add_column("on the mirror")
    cached: dict[str, list[str]] = {}
    for src in list_cached():
        cached.setdefault(".".join(src.version.split(".")[:2]), []).append(f"{src.version} ({src.provider})")
    try:
        available = list_available()
    except KhoConformError as e:
        console.print(f"[yellow]mirror: {e}[/]")
        available = {}
    for series in sorted(cached.keys() | available.keys()):
        table.add_row(series, "\n".join(cached.get(series, [])) or "-", ", ".join(available.get(series, [])) or "-")
    out.print(table)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from .native.build import build

    src = _source(args)
    with console.status(f"building {src.version} ps{args.page_shift} {args.flavor}"):
        b = build(src, args.page_shift, args.flavor, force=args.force)
    out.print(str(b.library))
    info = {**b.identity(), "api": b.api, "compatible": b.compatible, "unit_bytes": b.unit_bytes,
            "build_seconds": b.seconds, "cached": b.cached, "kept": len(b.kept), "dropped": b.dropped}
    out.print_json(json.dumps(info))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .check import Plan, run_check
    from .compare.triage import load_known
    from .report import exit_status, summary_table, write_report
    from .source import resolve

    load_known()  # a broken known-finding record: one line naming it, before any work
    if args.kernel_tree or args.kernel_tarball:
        sources = [resolve(None, args.kernel_tree, args.kernel_tarball, args.patch, commits=args.commits)]
        selections = {sources[0].digest(): _reproduce_flags(args)}
    else:
        sources = [resolve(k, None, None, args.patch) for k in (args.kernel or [DEFAULT_KERNEL])]
        patch = f" --patch {args.patch}" if args.patch else ""
        selections = {s.digest(): f"--kernel {s.version}{patch}" for s in sources}
    partners = [resolve(v, None, None, None) for v in args.handover_with or ()]
    selections |= {p.digest(): f"--kernel {p.version}" for p in partners}
    plan = Plan(sources=sources, page_shifts=tuple(args.page_shift), flavors=tuple(args.flavor), examples=args.examples,
                fuzz_seconds=args.fuzz_time, crashes_dir=args.crashes, work_dir=args.out / "fuzz", coverage=args.coverage,
                selections=selections, partners=partners)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("check", total=None)
        report = run_check(plan, args.out, progress=lambda s: bar.update(task, description=s))
    paths = write_report(report, args.out)
    if args.email:
        from .report import render_email

        args.email.parent.mkdir(parents=True, exist_ok=True)
        args.email.write_text(render_email(report), encoding="utf-8")
        paths["email"] = args.email
    out.print(summary_table(report))
    for cell in report.cells:
        for check in cell.checks:
            if check.status == "error":  # a broken check says why here, not only in the report
                console.print(f"[red]error[/] {escape(f'{cell.name} {check.name}: {check.detail}')}", highlight=False)
    for kind, path in paths.items():
        out.print(f"{kind:9} {path}")
    return exit_status(report)


def cmd_fuzz(args: argparse.Namespace) -> int:
    from fuzz.runner import run_fuzz

    source, partner = _source(args), _partner(args)
    old, new = (partner, source) if args.handover_from else (source, partner)
    stats = run_fuzz(source=old, next_source=new, page_shift=args.page_shift, corpus_dir=args.corpus, jobs=args.jobs,
                     seconds=args.time, crashes_dir=args.crashes, live=True)
    out.print(f"{stats.execs} execs, {stats.exec_per_s:.0f} exec/s, coverage {stats.coverage}, "
              f"corpus {stats.corpus} (started from {stats.started_from}), {len(stats.new_findings)} new findings")
    for path in stats.new_findings:
        out.print(f"  kho-conform replay {path}")
    if stats.crash_inputs or stats.lost_crash_inputs:
        lost = f" ({stats.lost_crash_inputs} more whose input was lost in a hung crash report)" \
            if stats.lost_crash_inputs else ""
        out.print(f"{len(stats.crash_inputs)} inputs ended a worker{lost}; "
                  "kho-conform replay, with this run's kernel options, runs one (the worker's report is beside it, .log):")
        for path in stats.crash_inputs:
            out.print(f"  {path}")
    if args.coverage:
        from datetime import datetime, timezone

        from .check import measure_coverage, tool_version
        from .report import Report, write_report

        with console.status(f"coverage of the corpus on {source.version} ps{args.page_shift}"):
            cov = measure_coverage(source, (args.page_shift,), args.out / "coverage", scenarios=False,
                                   corpora={args.page_shift: [args.corpus]})
        report = Report(title=f"KHO fuzz corpus coverage ({args.corpus})", tool_version=tool_version(), cells=[],
                        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), coverage=[cov])
        t = cov.file.totals
        out.print(f"coverage of {cov.file.file}: {t['covered']}/{t['lines']} lines, {t['branches_taken']}/{t['branches']} "
                  f"branch outcomes; changed lines executed {t['changed_covered']}/{t['changed_executable']}")
        out.print(f"html      {write_report(report, args.out)['html']}")
    return 0


def _finding_defaults(args: argparse.Namespace) -> None:
    """A saved finding names its kernel source, page shift, flavor and model
    profile: replay and minimize use them unless told otherwise."""
    from fuzz.findings import finding_of

    if not args.file.exists():
        raise KhoConformError(f"{args.file}: no such file; give a program text, a finding directory or a fuzzer input")
    args.finding = finding_of(args.file)
    if args.finding:
        if args.page_shift is None:
            args.page_shift = args.finding["page_shift"]
        if args.flavor is None:
            args.flavor = args.finding["flavor"]
    if args.page_shift is None and args.file.is_file() and args.file.suffix != ".bin":
        from reference.program import ProgramError, parse_program

        try:  # a text program says its page shift in its header
            args.page_shift = parse_program(args.file.read_text()).header.page_shift
        except (ProgramError, UnicodeDecodeError, OSError):
            pass
    if args.page_shift is None:
        args.page_shift = 12
    if args.flavor is None:
        args.flavor = "plain"


def cmd_replay(args: argparse.Namespace) -> int:
    from fuzz.minimize import replay

    text, diverged = replay(args.file, _target(args), as_json=args.json)
    out.print(text, markup=False, highlight=False)
    return 1 if diverged else 0


def cmd_minimize(args: argparse.Namespace) -> int:
    from fuzz.minimize import minimize_file

    path = minimize_file(args.file, _target(args), args.out)
    out.print(str(path))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import exit_status, load_report, render_email, summary_table, write_report

    try:
        report = load_report(args.source)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KhoConformError(f"{args.source}: not a report.json of kho-conform ({e}); pass the report.json check wrote") from None
    if args.format == "email":
        sys.stdout.write(render_email(report))  # as is: no console markup, emoji or wrapping
        return exit_status(report)
    for kind, path in write_report(report, args.out).items():
        out.print(f"{kind:9} {path}")
    out.print(summary_table(report))
    return exit_status(report)


def cmd_export(args: argparse.Namespace) -> int:
    from .check import tool_version
    from .export import export_kunit, finding_source
    from .native.kunit import run_kunit

    if not (args.finding / "finding.json").is_file():
        raise KhoConformError(f"{args.finding}: not a saved finding; pass a corpus/crashes/<signature>/ directory")
    exported = export_kunit(args.finding, tool_version())
    if args.page_shift not in (None, exported.page_shift):
        raise KhoConformError(f"the finding is a page shift {exported.page_shift} program; drop --page-shift {args.page_shift}")
    path = args.out or Path(f"{exported.name}.c")
    path.write_text(exported.text)
    out.print(f"kunit     {path}")
    if args.no_run:
        return 0
    own = not (args.kernel or args.kernel_tree or args.kernel_tarball or args.patch)
    source = finding_source(args.finding) if own else _source(args)
    with console.status(f"building and running {path.name} on {source.version}"):
        result = run_kunit(source, exported.page_shift, path)
    sys.stdout.write(result.output)
    where = f"{source.version} ({source.provider})"
    if own:
        if not result.failed:
            raise KhoConformError(f"the exported test does not fail on the finding's own kernel {where}: the divergence is "
                                  "not visible through the exported API; the file is kept for reference")
        out.print(f"fails on {where}, as the finding does: it reproduces it")
        return 0
    out.print(f"{'passes' if result.passed else 'fails'} on {where}")
    return 0 if result.passed else 1


def cmd_mutate(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .check import tool_version
    from .mutate import Settings, plan, run_mutation
    from .mutate.runner import STATE
    from .report import Report, mutation_table, write_report

    source = _source(args)
    settings = Settings(args.page_shift, args.fuzz_inputs, args.timeout, args.jobs)
    functions = [f for item in args.functions or () for f in item.split(",") if f]
    with console.status(f"generating the mutants of {source.version} ps{args.page_shift}"):
        p = plan(source, settings, args.out, functions or None)
    if args.list:
        for m in p.mutants:
            out.print(f"{m.name}  {m.description}", markup=False, highlight=False)
        return 0
    lines = f", lines {', '.join(f'{a}-{b}' for a, b in p.lines)} of the series" if p.lines else ""
    resumed = f"; {len(p.done)} already done in {args.out / STATE}" if p.done else ""
    console.print(f"{len(p.mutants)} mutants of {len(p.functions)} function{'s' * (len(p.functions) != 1)}{lines}{resumed}",
                  highlight=False)
    counts = {"killed": 0, "survived": 0, "did-not-build": 0, "timed-out": 0}
    for r in p.done.values():
        counts[r.status] += 1
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("mutants", total=len(p.mutants), completed=len(p.done))

        def progress(r) -> None:
            counts[r.status] += 1
            bar.update(task, advance=1, description=", ".join(f"{n} {s}" for s, n in counts.items()))

        result = run_mutation(source, settings, args.out, p, progress)
    report = Report(title=f"KHO mutation testing: {source.version} ps{args.page_shift}", tool_version=tool_version(),
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"), cells=[], mutation=[result])
    paths = write_report(report, args.out)
    for m in result.survivors():
        out.print(f"survived {m.name}  {m.description}", markup=False, highlight=False)
        out.print(m.diff.rstrip("\n"), markup=False, highlight=False)
    out.print(mutation_table(result))
    for kind, path in paths.items():
        out.print(f"{kind:9} {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    run_bench(_source(args), args.page_shift, quick=args.quick, console=out, as_json=args.json, only=args.only or ())
    return 0


class _Parser(argparse.ArgumentParser):
    """Bad flags get one line, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _count(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small: give {minimum} or more")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kho-conform", description="Differential conformance and fuzzing for the Linux KHO radix tree.")
    sub = p.add_subparsers(dest="command", required=True)

    k = sub.add_parser("kernel", help="fetch kernel sources into the cache, or list them")
    k.add_argument("action", choices=("fetch", "list"))
    k.add_argument("versions", nargs="*", default=[DEFAULT_KERNEL], help=f"versions to fetch (default {DEFAULT_KERNEL})")
    k.set_defaults(fn=cmd_kernel)

    b = sub.add_parser("build", help="build the kernel's KHO code as a userspace library; print its path and source identity")
    _kernel_args(b)
    b.add_argument("--flavor", choices=("plain", "asan", "fuzz", "coverage"), default="plain")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.set_defaults(fn=cmd_build)

    c = sub.add_parser("check", help="the conformance matrix: kernels x page shifts x flavors, with a report")
    c.add_argument("--kernel", action="append", metavar="VERSION", help=f"kernel version; repeat for several (default {DEFAULT_KERNEL})")
    c.add_argument("--kernel-tree", type=Path, metavar="PATH")
    c.add_argument("--kernel-tarball", type=Path, metavar="PATH")
    _patch_args(c)
    c.add_argument("--page-shift", type=int, nargs="+", choices=PAGE_SHIFTS, default=list(PAGE_SHIFTS))
    c.add_argument("--flavor", nargs="+", choices=("plain", "asan"), default=["plain", "asan"])
    c.add_argument("--examples", type=_count(1), default=30, help="stateful examples per cell (default %(default)s)")
    c.add_argument("--fuzz-time", type=_count(0), default=20, metavar="SECONDS", help="fuzzing per kernel and page shift (default %(default)s; 0: none)")
    c.add_argument("--crashes", type=Path, default=Path("corpus/crashes"), help="where new findings are saved")
    c.add_argument("--out", type=Path, default=Path("reports"))
    c.add_argument("--coverage", action="store_true",
                   help="also measure the kernel file's line/branch coverage (scenarios, state machine, fuzz corpus), "
                        "with the patch's lines marked")
    c.add_argument("--email", type=Path, metavar="FILE", help="also write the report as plain text to mail (72 columns)")
    c.add_argument("--handover-with", action="append", metavar="VERSION",
                   help="released kernel the kernel under test hands over to and boots from (both directions; repeat "
                        "for several); default: handovers between the --kernel versions themselves")
    c.set_defaults(fn=cmd_check)

    f = sub.add_parser("fuzz", help="fuzz continuously with libFuzzer workers, restarted after a crash; resumable corpus; live stats")
    _kernel_args(f)
    _handover_args(f)
    f.add_argument("--jobs", type=_count(1), default=1, help="libFuzzer workers (default %(default)s)")
    f.add_argument("--time", type=_count(1), default=60, metavar="SECONDS", help="how long to fuzz (default %(default)s)")
    f.add_argument("--crashes", type=Path, default=Path("corpus/crashes"))
    f.add_argument("--coverage", action="store_true",
                   help="afterwards, measure the kernel file's coverage by the corpus; report in --out")
    f.add_argument("--out", type=Path, default=Path("reports"), help="where --coverage writes its report")
    f.add_argument("corpus", type=Path, metavar="CORPUS_DIR")
    f.set_defaults(fn=cmd_fuzz)

    r = sub.add_parser("replay", help="reproduce a finding or run a hand-written program, printing its trace")
    _kernel_args(r, page_shift_default=None)
    _handover_args(r)
    _flavor_arg(r)
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.add_argument("file", type=Path, metavar="FILE")
    r.set_defaults(fn=cmd_replay)

    m = sub.add_parser("minimize", help="minimize a diverging program, keeping its divergence signature")
    _kernel_args(m, page_shift_default=None)
    _handover_args(m)
    _flavor_arg(m)
    m.add_argument("--out", type=Path)
    m.add_argument("file", type=Path, metavar="FILE")
    m.set_defaults(fn=cmd_minimize)

    rep = sub.add_parser("report", help="re-render a report from its report.json")
    rep.add_argument("source", type=Path, metavar="REPORT_JSON")
    rep.add_argument("--out", type=Path, default=Path("reports"))
    rep.add_argument("--format", choices=("all", "email"), default="all",
                     help="all: write every format into --out; email: print plain text to mail (72 columns)")
    rep.set_defaults(fn=cmd_report)

    ex = sub.add_parser("export", help="turn a saved finding into a test the kernel keeps (KUnit)")
    ex.add_argument("kind", choices=("kunit",))
    ex.add_argument("finding", type=Path, metavar="FINDING", help="a saved finding: corpus/crashes/<signature>/")
    ex.add_argument("--out", "-o", type=Path, metavar="FILE", help="where to write the test (default: ./kho_conform_<signature>.c)")
    ex.add_argument("--no-run", action="store_true", help="only write the file (default: build it into the kernel's KHO code "
                                                            "here and run it: on the finding's kernel, or the one given)")
    _kernel_args(ex, page_shift_default=None)
    ex.set_defaults(fn=cmd_export)

    mu = sub.add_parser("mutate", help="measure the suite's oracle: mutants of the reached KHO functions, each built and "
                                        "held to the model by the scenarios and a fuzz budget; killed/survived per function")
    _kernel_args(mu)
    mu.add_argument("--functions", nargs="+", metavar="NAME", help="mutate only these functions (names or a comma list)")
    mu.add_argument("--jobs", type=_count(1), default=1, help="mutants built and run at once (default %(default)s)")
    mu.add_argument("--fuzz-inputs", type=_count(0), default=200, metavar="N",
                    help="random fuzzer inputs after the scenarios and seeds (default %(default)s)")
    mu.add_argument("--timeout", type=_count(1), default=120, metavar="SECONDS",
                    help="wall-clock budget per mutant, its build included (default %(default)s)")
    mu.add_argument("--out", type=Path, default=Path("reports/mutate"),
                    help="the report and the resumable state, mutants.jsonl (default %(default)s)")
    mu.add_argument("--list", action="store_true", help="only list the mutants")
    mu.set_defaults(fn=cmd_mutate)

    from .bench import MEASUREMENTS

    be = sub.add_parser("bench", help="speed and memory: native kernel, binding, model, differential run, fuzz harness, 10^6 pages")
    _kernel_args(be)
    be.add_argument("--quick", action="store_true", help="fewer iterations")
    be.add_argument("--json", action="store_true", help="the results as JSON on stdout (tables on stderr)")
    be.add_argument("--only", nargs="+", metavar="NAME", choices=[m.name for m in MEASUREMENTS if m.name != "targets"],
                    help="only these measurements (default: all of %(choices)s)")
    be.set_defaults(fn=cmd_bench)
    return p


def _sanitizer_flavor(args: argparse.Namespace) -> str:
    """The flavor whose library this command loads into its own process."""
    if args.command in ("replay", "minimize"):
        _finding_defaults(args)
        return args.flavor
    if args.command == "check" and "asan" in args.flavor:
        return "asan"
    return "plain"


def main(argv: list[str] | None = None) -> int:
    processes.handle_termination()
    try:
        args = parser().parse_args(argv)
        from .native.sanitizer import ensure_process_for

        ensure_process_for(_sanitizer_flavor(args))  # may re-exec: before anything is started
        if args.command != "report":
            processes.guard()  # nothing this command starts outlives it
        return args.fn(args)
    except KhoConformError as e:
        console.print(f"[bold red]kho-conform: error:[/] {e}", highlight=False)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, processes.Terminated) else "interrupted"
        console.print(f"kho-conform: {what}; saved findings and corpus are kept", highlight=False)
        return processes.exit_code(e)


if __name__ == "__main__":
    sys.exit(main())

"""Running mutants: each in a worker process of its own, held to the model
check by check against the unmutated kernel.

A worker loads one library (one mutant's, or the unmutated kernel's for the
baseline), so a mutant that crashes or hangs ends only its worker. It runs
the checks in order, the scenario library at the page shift and then the
fuzz budget (the seeds and ``fuzz_inputs`` deterministic random inputs,
decoded and compared in process), and stops at the first check whose triage
verdict (status and the signatures of new divergences) differs from the
unmutated kernel's: the mutant is killed. A check that raises is an error
verdict, so it kills too. A mutant that survives every check is reported
with the checks on which its kernel still behaved differently from the
unmutated one (return codes, tree, FDT, restored map...): a change the
comparison did not turn into a verdict, which is where an oracle gap shows.

Workers run ``jobs`` at a time as supervised process groups
(``conformance.processes``): a worker past ``timeout`` seconds is stopped
(timed-out), and however ``mutate`` ends, none outlives it. Every finished
mutant is appended to ``mutants.jsonl`` in the output directory at once; a
new run with the same kernel, page shift, budget and suite skips the
mutants recorded there (ids are stable), so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import processes
from ..compare.diff import compare
from ..compare.target import target_for
from ..compare.triage import triage
from ..corpus import seeds_dir
from ..errors import KhoConformError
from ..native.build import build, rebuild
from ..report.schema import MutantResult, MutationResult
from ..source import KernelSource, cache_dir
from ..source.cache import hash_files
from ..source.identity import ranges_of
from ..source.tree_files import KHO_C
from .mutants import Mutant, apply, check_functions, diff, generate, kernel_text, select

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STATE = "mutants.jsonl"
BASELINE = "baseline.json"
MAX_CHANGED = 12  # checks listed per survivor whose behaviour changed
_WORKER = "from conformance.mutate.runner import worker_main; worker_main()"
# What the verdicts depend on besides the kernel: a change here is another oracle.
_ORACLE_FILES = ("reference/*.py", "conformance/compare/*.py", "conformance/programs/*.py", "fuzz/decode.py",
                 "conformance/native/c/**/*.[ch]", "conformance/native/*.py", "corpus/known/*.toml", "corpus/seeds/*.bin")


@dataclass(frozen=True)
class Settings:
    page_shift: int = 12
    fuzz_inputs: int = 200  # random inputs after the seeds, per surviving mutant
    timeout: float = 120.0  # wall-clock seconds per mutant, build included
    jobs: int = 1


# ---- the checks, and what a worker observes ----------------------------------------------


def checks(page_shift: int, fuzz_inputs: int) -> list[tuple[str, object]]:
    """(name, program) of every check, in the order they run: the scenario
    library, the fuzz seeds, then deterministic random fuzzer inputs."""
    from fuzz.decode import decode

    from ..programs.scenarios import scenarios

    out: list[tuple[str, object]] = [(s.name, s.program) for s in scenarios(page_shift)]
    out += [(f"fuzz.seed:{p.stem}", decode(p.read_bytes(), page_shift)) for p in sorted(seeds_dir().glob("*.bin"))]
    rng = random.Random(0x6B686F)  # the same inputs for the baseline and every mutant
    out += [(f"fuzz.random:{i}", decode(rng.randbytes(rng.randrange(1, 512)), page_shift)) for i in range(fuzz_inputs)]
    return out


def _behaviour(outcomes: list) -> dict[str, str]:
    """A fingerprint per observable field of the kernel's runs (its own run
    and its restores of the model's image): what a mutant may change. The
    printk log and event texts are left out: they name addresses and paths."""
    out: dict[str, str] = {}
    for n, o in enumerate(outcomes):
        pre = "" if n == 0 else "restore-of-model-image."
        fields = {
            "boot": (o.boot.rc, o.boot.value, o.boot.value2, len(o.boot.warnings)),
            "ops": [(r.rc, r.value, r.value2, len(r.warnings)) for r in o.ops],
            "warning-sites": [r.warnings for r in (o.boot, *o.ops)],
            "root_phys": o.root_phys, "tree": [t.canonical() for t in o.tree], "node_pages": o.node_pages, "fdt": o.fdt,
            "events": [(e.split(":", 1)[0].split(" ", 1)[0], at) for e, at in zip(o.events, o.event_ops)],
            "reports": [r.site for r in o.reports],
        }
        if o.image is not None:
            fields.update({f"image.{k}": v for k, v in asdict(o.image).items()})
        if o.next is not None:
            fields.update({f"next.{k}": v for k, v in asdict(o.next).items() if k != "reason"})
        out.update({pre + k: _digest(v) for k, v in fields.items()})
    return out


def _digest(value: object) -> str:
    return hashlib.blake2b(repr(value).encode(), digest_size=8).hexdigest()


def observe(program, target) -> dict:
    """One check: the verdict (status, new divergences' signatures), a line
    saying why, and the kernel's behaviour."""
    try:
        cmp = compare(program, target)
        if cmp.ok:
            verdict, detail = ["pass"], ""
        else:
            v = triage(cmp, target, attribute=False)
            verdict, detail = [v.status, sorted({d.signature for d in v.new})], v.divergence.line()
        behaviour = _behaviour([cmp.kernel, *cmp.native.restores.values()])
    except Exception as e:  # a check that raises is an error verdict: it kills
        verdict, detail, behaviour = ["error", type(e).__name__], f"{type(e).__name__}: {e}", {}
    return {"verdict": verdict, "detail": detail[:300], "behaviour": behaviour}


# ---- the worker ----------------------------------------------------------------------


def mutant_source(source: KernelSource, mutant: Mutant, root: Path) -> KernelSource:
    """``source`` with ``mutant`` applied, as a tree of its files under ``root``."""
    for rel in source.files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.root / rel, root / rel)
    (root / KHO_C).write_text(apply(kernel_text(source.root), mutant.edits), errors="surrogateescape")
    return KernelSource(source.version, f"{source.provider}+mutant:{mutant.id}", root, hash_files(root),
                        source.makefile_version, source.patches, source.changed_lines)


def run_worker(spec: dict) -> dict:
    """Baseline (no mutant: every check's observation) or one mutant (its
    verdict against the baseline's)."""
    source = KernelSource.from_identity(spec["source"], Path(spec["root"]))
    ps = spec["page_shift"]
    programs = checks(ps, spec["fuzz_inputs"])
    if spec["mutant"] is None:
        target = target_for(build(source, ps))
        return {"checks": {name: observe(program, target) for name, program in programs}}
    mutant = Mutant.from_json(spec["mutant"])
    baseline = json.loads(Path(spec["baseline"]).read_text())["checks"]
    with processes.temp_dir(Path(spec["scratch"]), prefix=f"{mutant.id}-") as work:
        try:  # the unmutated build's extraction and objects, its kernel unit mutated and compiled again
            b = rebuild(build(source, ps), lambda unit: apply(unit, mutant.edits), mutant_source(source, mutant, work / "tree"),
                        work / "build")
        except KhoConformError as e:
            return {"status": "did-not-build", "detail": str(e)[:300]}
        target = target_for(b)
        changed = []
        for name, program in programs:
            seen, want = observe(program, target), baseline[name]
            if seen["verdict"] != want["verdict"]:
                return {"status": "killed", "check": name, "detail": seen["detail"] or f"{seen['verdict'][0]} "
                        f"where the unmutated kernel's verdict is {want['verdict'][0]}"}
            fields = sorted(k for k in seen["behaviour"].keys() | want["behaviour"].keys()
                            if seen["behaviour"].get(k) != want["behaviour"].get(k))
            if fields:
                changed.append(f"{name}: {', '.join(fields)}")
        more = [f"... and {len(changed) - MAX_CHANGED} more checks"] if len(changed) > MAX_CHANGED else []
        return {"status": "survived", "changed": changed[:MAX_CHANGED] + more}


def worker_main() -> None:
    """A worker process: the spec (JSON) on stdin, the result (JSON) as the last line on stdout."""
    processes.handle_termination()
    print(json.dumps(run_worker(json.load(sys.stdin))), flush=True)


# ---- the run -------------------------------------------------------------------------


def _oracle_digest() -> str:
    h = hashlib.sha256()
    for pattern in _ORACLE_FILES:
        for path in sorted(PROJECT_ROOT.glob(pattern)):
            h.update(str(path.relative_to(PROJECT_ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def run_key(source: KernelSource, settings: Settings) -> dict:
    """What results can be resumed under: the same kernel files, page shift,
    fuzz budget and oracle (the suite's model, comparison and programs)."""
    return {"kernel": source.version, "digest": source.digest(), "page_shift": settings.page_shift,
            "fuzz_inputs": settings.fuzz_inputs, "oracle": _oracle_digest()}


def load_state(path: Path, key: dict) -> dict[str, MutantResult]:
    """The mutants a run into the same directory finished (a half-written
    last line, from a kill, is not a result)."""
    if not path.is_file():
        return {}
    done: dict[str, MutantResult] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "run" in record:
            theirs = record["run"]
            differs = next((k for k in key if theirs.get(k) != key[k]), None)
            if differs:
                raise KhoConformError(f"{path} holds a run with another {differs} ({theirs.get(differs)} here "
                                      f"{key[differs]}); pass another --out, or remove the file to start over")
        elif isinstance(record, dict) and "status" in record:
            try:
                result = MutantResult(**record)
            except (TypeError, ValueError):
                continue
            done[result.id] = result
    return done


class _Run:
    def __init__(self, source: KernelSource, settings: Settings, out: Path, scratch: Path, text: str,
                 progress: Callable[[MutantResult], None]) -> None:
        self.source, self.settings, self.out, self.scratch, self.text = source, settings, out, scratch, text
        self.progress = progress
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.live: set[subprocess.Popen] = set()
        self.results: list[MutantResult] = []

    def spec(self, mutant: Mutant | None) -> bytes:
        return json.dumps({"source": self.source.identity(), "root": str(self.source.root),
                           "page_shift": self.settings.page_shift, "fuzz_inputs": self.settings.fuzz_inputs,
                           "mutant": None if mutant is None else mutant.to_json(),
                           "baseline": str(self.out / BASELINE), "scratch": str(self.scratch)}).encode()

    def worker(self, mutant: Mutant | None, timeout: float | None) -> tuple[dict | None, str]:
        """Run a worker; (its result, or None if it timed out or died, and why)."""
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(PROJECT_ROOT), env.get("PYTHONPATH"))))
        with processes.supervised([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env) as proc:
            with self.lock:
                self.live.add(proc)
            try:
                out, err = proc.communicate(self.spec(mutant), timeout=timeout)
            except subprocess.TimeoutExpired:
                return None, f"over the {timeout:.0f} s budget per mutant"
            finally:
                with self.lock:
                    self.live.discard(proc)
        lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            return json.loads(lines[-1]), ""
        if proc.returncode < 0:
            return None, f"the worker died of {signal.Signals(-proc.returncode).name}"
        last = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        return None, f"the worker failed (exit {proc.returncode}): {last}"

    def mutant(self, m: Mutant) -> MutantResult | None:
        start = time.monotonic()
        result, why = self.worker(m, self.settings.timeout)
        if self.stopping.is_set():
            return None  # interrupted: no verdict
        seconds = round(time.monotonic() - start, 2)
        base = {"id": m.id, "function": m.function, "line": m.line, "kind": m.kind, "description": m.description,
                "seconds": seconds}
        if result is None and why.startswith("over"):
            return MutantResult(**base, status="timed-out", detail=why)
        if result is None:  # the kernel code took its process down: the check errored
            return MutantResult(**base, status="killed", check="(worker)", detail=why[:300])
        if result["status"] == "survived":
            return MutantResult(**base, status="survived", diff=diff(self.text, m), changed=result["changed"])
        return MutantResult(**base, status=result["status"], check=result.get("check", ""), detail=result["detail"])

    def baseline(self, key: dict) -> None:
        """The unmutated kernel's observations, made once per run key."""
        path = self.out / BASELINE
        try:
            if json.loads(path.read_text()).get("run") == key:
                return
        except (OSError, ValueError):
            pass
        result, why = self.worker(None, None)
        if result is None:
            raise KhoConformError(f"the unmutated kernel's checks could not run: {why}")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"run": key, **result}))
        os.replace(tmp, path)

    def run(self, todo: list[Mutant], state: Path) -> None:
        pending: queue.Queue[Mutant] = queue.Queue()
        for m in todo:
            pending.put(m)

        def job() -> None:
            while not self.stopping.is_set():
                try:
                    m = pending.get_nowait()
                except queue.Empty:
                    return
                result = self.mutant(m)
                if result is None:
                    return
                with self.lock:
                    with state.open("a") as f:  # one whole line per mutant, on disk before the next starts
                        f.write(json.dumps(asdict(result)) + "\n")
                        f.flush()
                        os.fsync(f.fileno())
                    self.results.append(result)
                self.progress(result)

        threads = [threading.Thread(target=job, daemon=True) for _ in range(min(self.settings.jobs, len(todo)))]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.2)
        except KeyboardInterrupt:
            self.stopping.set()
            with self.lock:
                live = list(self.live)
            for proc in live:
                processes.stop(proc, grace=1.0)
            for t in threads:
                t.join()
            raise


@dataclass(frozen=True)
class Plan:
    """What ``mutate`` runs: the mutants, and those already done."""

    mutants: list[Mutant]
    done: dict[str, MutantResult]
    functions: list[str]
    lines: tuple[tuple[int, int], ...] | None  # the series' changed lines mutated, if a series was applied
    text: str  # the kernel file, for diffs


def plan(source: KernelSource, settings: Settings, out: Path, functions: list[str] | None = None) -> Plan:
    """The mutants of ``source``'s reached ``functions`` (all by default)
    and, when a patch series was applied, of only the lines it changed; with
    what ``out`` already holds of them."""
    generated = generate(build(source, settings.page_shift))
    if functions:
        check_functions(functions, generated.functions)
    changed = source.changed_lines.get(KHO_C) if source.patches else None
    lines = {n for a, b in changed for n in range(a, b + 1)} if changed is not None else None
    mutants = select(generated.mutants, functions, lines)
    if not mutants:
        what = f" of {', '.join(functions)}" if functions else ""
        where = " on the lines the series changes" if lines is not None else ""
        raise KhoConformError(f"no mutants{what}{where}: the series changes no code of a function the harness reaches"
                              if lines is not None else f"no mutants{what}{where}; choose other --functions")
    done = load_state(out / STATE, run_key(source, settings))
    order = [f for f in generated.functions if any(m.function == f for m in mutants)]
    return Plan(mutants, {m.id: done[m.id] for m in mutants if m.id in done}, order,
                ranges_of(lines) if lines is not None else None, kernel_text(source.root))


def run_mutation(source: KernelSource, settings: Settings, out: Path, p: Plan,
                 progress: Callable[[MutantResult], None] = lambda r: None) -> MutationResult:
    """Run the plan's mutants not yet done (``jobs`` at a time), appending
    each result to ``out/mutants.jsonl``; the whole plan's results."""
    out.mkdir(parents=True, exist_ok=True)
    state = out / STATE
    key = run_key(source, settings)
    if not state.is_file():
        state.write_text(json.dumps({"run": key}) + "\n")
    start = time.monotonic()
    todo = [m for m in p.mutants if m.id not in p.done]
    with processes.temp_dir(cache_dir() / "mutants", prefix="run-") as scratch:
        run = _Run(source, settings, out, scratch, p.text, progress)
        if todo:
            run.baseline(key)
            run.run(todo, state)
    results = {**p.done, **{r.id: r for r in run.results}}
    settings_json = {**asdict(settings), "functions": p.functions, "lines": [list(r) for r in p.lines or ()],
                     "mutants": len(p.mutants), "resumed": len(p.done)}
    return MutationResult(source.version, source.identity(), settings.page_shift, settings_json, p.functions,
                          [results[m.id] for m in p.mutants if m.id in results], round(time.monotonic() - start, 1))

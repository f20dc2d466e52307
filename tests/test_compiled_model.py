"""The reference model runs compiled (mypyc) unless KHO_CONFORM_MODEL=python,
and the two give the same outcomes (conformance/native/compiled_model.py).
`make test` runs the suite compiled, then the model's own tests pure."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
from conftest import REPO, child_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance.errors import KhoConformError
from conformance.native import compiled_model
from conformance.native.compiled_model import MODEL_ENV, model_kind
from fuzz.decode import decode
from reference import model, quirks
from reference.profiles import PROFILES

HERE = os.environ.get(MODEL_ENV) or "compiled"
OTHER = "python" if HERE == "compiled" else "compiled"

# A child running the other model on the programs it reads (pickled) from stdin.
_CHILD = r"""
import pickle, sys
import conformance
from conformance.native.compiled_model import model_kind
from reference import model
from reference.profiles import PROFILES
programs = pickle.load(sys.stdin.buffer)
out = [model.run(p, PROFILES[name], frozenset(quirks)) for p, name, quirks in programs]
sys.stdout.buffer.write(pickle.dumps((model_kind(), out)))
"""


def test_the_model_runs_as_asked():
    assert model_kind() == HERE  # a failed build would fall back to Python: this says so
    assert model.__file__.endswith(".py") == (HERE == "python")


def _in_other_model(programs: list) -> list:
    env = {**child_env(), MODEL_ENV: OTHER if OTHER == "python" else ""}
    proc = subprocess.run([sys.executable, "-c", _CHILD], input=pickle.dumps(programs), capture_output=True,
                          cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    kind, out = pickle.loads(proc.stdout)
    assert kind == OTHER
    return out


SEEDS = sorted((REPO / "corpus" / "seeds").iterdir())
QUIRKED = tuple(sorted(quirks.ALL))


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=st.lists(st.binary(min_size=8, max_size=512), min_size=20, max_size=40))
def test_compiled_and_pure_models_agree(inputs: list[bytes]):
    """Seeds and fuzzer inputs, every profile, with and without quirks."""
    programs = [(decode(data, 12), name, quirks) for data in [p.read_bytes() for p in SEEDS] + inputs
                for name in PROFILES for quirks in ((), QUIRKED)]
    here = [model.run(p, PROFILES[name], frozenset(quirks)) for p, name, quirks in programs]
    assert here == _in_other_model(programs)


def test_a_failed_build_is_one_line_and_not_retried(tmp_path, monkeypatch, capsys):
    """A model that mypyc cannot compile: pure Python after one line naming
    why; the next run reads the failure instead of compiling again."""
    source = tmp_path / "reference"
    source.mkdir()
    (source / "__init__.py").write_text("")
    (source / "broken.py").write_text('count: int = "not a number"\n')
    monkeypatch.setattr(compiled_model, "SOURCE", source)
    monkeypatch.setenv("KHO_CONFORM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(KhoConformError, match="compiling the reference model with mypyc failed: .*") as first:
        compiled_model.build_compiled_model()
    assert "\n" not in str(first.value)
    monkeypatch.setattr(compiled_model, "supervised", None)  # compiling again would fail differently
    with pytest.raises(KhoConformError, match="to try again") as again:
        compiled_model.build_compiled_model()
    assert str(first.value) in str(again.value)
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # the build's scratch directory is gone

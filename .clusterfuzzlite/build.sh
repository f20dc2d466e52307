#!/bin/bash -eu
# Build the KHO differential fuzzer.
#
# In the OSS-Fuzz/ClusterFuzzLite image ($OUT set): build the kernel's KHO code
# as the "fuzz" flavor library, bundle it with the atheris entry point
# (fuzz/entry.py) through compile_python_fuzzer, plus the dictionary and the
# seed corpus. There a new divergence is a crash (the entry point raises), so ClusterFuzz records it.
#
# Locally (--local, or $OUT unset): the same into ./build/cflite/, with a
# wrapper script in place of the PyInstaller bundle, then run the fuzzer for a
# few seconds to prove it starts and executes inputs.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOCAL=0
PYTHON="${PYTHON:-python3}"
if [[ "${1:-}" == "--local" || -z "${OUT:-}" ]]; then
  LOCAL=1
  OUT="$ROOT/build/cflite"
fi
KERNEL="${KHO_CFLITE_KERNEL:-$("$PYTHON" -c "from conformance.source import DEFAULT_KERNEL; print(DEFAULT_KERNEL)")}"
PAGE_SHIFT="${KHO_CFLITE_PAGE_SHIFT:-12}"
FUZZER=kho_fuzzer
mkdir -p "$OUT"

# The library and the metadata target_for() needs: the entry point loads this bundle.
"$PYTHON" - "$KERNEL" "$PAGE_SHIFT" "$OUT/kho_target" <<'PY'
import sys
from pathlib import Path
from conformance.native.build import build, save_bundle
from conformance.source import fetch
kernel, page_shift, dest = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
b = build(fetch(kernel), page_shift, "fuzz")
save_bundle(b, dest)
print(f"built {b.source.version} ({b.source.provider}) ps{page_shift} fuzz -> {dest}")
PY

cp fuzz/kho.dict "$OUT/$FUZZER.dict"
rm -f "$OUT/${FUZZER}_seed_corpus.zip"
(cd corpus/seeds && zip -q -j "$OUT/${FUZZER}_seed_corpus.zip" ./*.bin)

if [[ $LOCAL == 0 ]]; then
  cp fuzz/entry.py "$SRC/$FUZZER.py"
  compile_python_fuzzer "$SRC/$FUZZER.py" --add-data "$OUT/kho_target:kho_target"
  exit 0
fi

PRELOAD="$("$PYTHON" -c 'from conformance.native.sanitizer import sanitizer_preload; print(sanitizer_preload("fuzz"))')"
ASAN="$("$PYTHON" -c 'from conformance.native.sanitizer import SANITIZER_ENV; print(SANITIZER_ENV["ASAN_OPTIONS"])')"
cat > "$OUT/$FUZZER" <<SH
#!/bin/sh
# Local stand-in for the compile_python_fuzzer wrapper.
this_dir=\$(dirname "\$0")
LD_PRELOAD="$PRELOAD" ASAN_OPTIONS="$ASAN" KHO_FUZZ_BUNDLE="\$this_dir/kho_target" \\
  PYTHONPATH="$ROOT\${PYTHONPATH:+:\$PYTHONPATH}" exec "$("$PYTHON" -c "import sys; print(sys.executable)")" "$ROOT/fuzz/entry.py" "\$@"
SH
chmod +x "$OUT/$FUZZER"

# Smoke run: findings go to a scratch directory so that known divergences of
# an unpatched kernel do not stop it.
rm -rf "$OUT/smoke"
mkdir -p "$OUT/smoke/corpus"
(cd "$OUT/smoke" && unzip -q "$OUT/${FUZZER}_seed_corpus.zip" -d corpus)
KHO_FUZZ_CRASHES="$OUT/smoke/findings" "$OUT/$FUZZER" -max_total_time=5 -dict="$OUT/$FUZZER.dict" \
  -artifact_prefix="$OUT/smoke/" "$OUT/smoke/corpus" 2> "$OUT/smoke/fuzzer.log" || true
if ! grep -q "^#[0-9].*\(DONE\|pulse\|NEW\).*cov:" "$OUT/smoke/fuzzer.log"; then
  tail -20 "$OUT/smoke/fuzzer.log" >&2
  echo "build.sh: the fuzzer did not run; see $OUT/smoke/fuzzer.log" >&2
  exit 1
fi
grep "^#[0-9]" "$OUT/smoke/fuzzer.log" | tail -1
echo "ok: $OUT/$FUZZER runs ($(find "$OUT/smoke/findings" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l) findings in the smoke run)"

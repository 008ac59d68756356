#!/usr/bin/env bash
# The package as users get it: build the sdist and wheel (python -m build) from the checkout's files (tracked and
# untracked-but-not-ignored, so no local build junk), check them (twine check --strict, the wheel holds only
# peft_cp_merge/ and its metadata, the sdist no tests/benchmarks/results), install the wheel (no extras) into a fresh
# virtual environment and, from a directory outside the checkout, run the console script and .ci/wheel_smoke.py.
# Everything lives in a temporary directory that is removed at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
work=$(mktemp -d "${TMPDIR:-/tmp}/peft-cp-merge-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
step() { printf -- '--- wheel: %s\n' "$*"; }

step "copy the checkout's files"
mkdir "$work/src"
git -C "$root" ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [[ -e "$root/$f" ]] && printf '%s\0' "$f"
done | tar -C "$root" --null -T - -cf - | tar -C "$work/src" -xf -

step "build sdist and wheel"
"$python" -m venv "$work/tools"
"$work/tools/bin/pip" install -q build twine
"$work/tools/bin/python" -m build --outdir "$work/dist" "$work/src" >"$work/build.log" 2>&1 || {
  cat "$work/build.log"; exit 1; }
ls -l "$work/dist"
"$work/tools/bin/twine" check --strict "$work/dist"/*

step "check what the wheel and the sdist hold"
"$work/tools/bin/python" - "$work/dist" "$work/src/pyproject.toml" <<'EOF'
import sys, tarfile, tomllib, zipfile
from pathlib import Path

dist, pyproject = Path(sys.argv[1]), Path(sys.argv[2])
version = tomllib.loads(pyproject.read_text())["project"]["version"]
(wheel,), (sdist,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
bad = []
if f"-{version}-" not in wheel.name or not sdist.name.endswith(f"-{version}.tar.gz"):
    bad.append(f"file names {wheel.name}, {sdist.name} do not carry pyproject.toml's version {version}")
names = zipfile.ZipFile(wheel).namelist()
info = f"peft_cp_merge-{version}.dist-info/"
extra = [n for n in names if not (n.startswith("peft_cp_merge/") or n.startswith(info))]
extra += [n for n in names if n.startswith("peft_cp_merge/") and not (n.endswith(".py") or n == "peft_cp_merge/py.typed")]
bad += [f"wheel holds {n}" for n in extra]
for needed in ("peft_cp_merge/py.typed", "peft_cp_merge/__init__.py", "peft_cp_merge/cli/__main__.py", info + "entry_points.txt"):
    if needed not in names:
        bad.append(f"wheel lacks {needed}")
top = {m.name.split("/", 2)[1] for m in tarfile.open(sdist).getmembers() if m.name.count("/") >= 1}
unexpected = top - {"peft_cp_merge", "peft_cp_merge.egg-info", "README.md", "CHANGELOG.md", "pyproject.toml",
                    "setup.cfg", "PKG-INFO", "MANIFEST.in", "LICENSE"}
bad += [f"sdist holds {n}" for n in sorted(unexpected)]
print(f"wheel: {len(names)} files, all under peft_cp_merge/ or {info}" if not extra else "")
print(f"sdist: {sorted(top)}")
if bad:
    sys.exit("\n".join(["wheel/sdist check FAILED:", *bad]))
EOF

step "install the wheel into a fresh virtual environment"
"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0   # the CPU build first, so the wheel's torch>=2.3 is already met
"$work/venv/bin/pip" install -q "$work/dist"/*.whl
"$work/venv/bin/pip" check

step "run it outside the checkout (offline)"
mkdir "$work/run"
cd "$work/run"
export PATH="$work/venv/bin:$PATH" HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
unset PYTHONPATH
peft-cp-merge --help >/dev/null
expected=$("$work/tools/bin/python" -c "import sys, tomllib; print(tomllib.load(open(sys.argv[1], 'rb'))['project']['version'])" "$work/src/pyproject.toml")
got=$(peft-cp-merge --version)
[[ "$got" == "peft-cp-merge $expected" ]] || { echo "peft-cp-merge --version printed '$got', expected $expected" >&2; exit 1; }
echo "$got"
methods=$(peft-cp-merge methods)
grep -qE "^cp[[:space:]]" <<<"$methods" || { echo "peft-cp-merge methods does not list cp" >&2; exit 1; }
# merge-only install: the library command names the extra instead of a traceback
if peft-cp-merge library info nowhere 2>"$work/library.err"; then
  echo "peft-cp-merge library ran without the [library] extra" >&2; exit 1
fi
grep -q "peft-cp-merge\[library\]" "$work/library.err" || { cat "$work/library.err" >&2; exit 1; }
python "$root/.ci/wheel_smoke.py"

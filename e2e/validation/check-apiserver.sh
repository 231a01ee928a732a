#!/usr/bin/env bash
# Runs the validation table (cases.yaml beside this script) against a real API server: every
# case is sent with `kubectl create --dry-run=server`; an accepted case must pass, a rejected
# one must fail with a message that names its field. Then the table of updates (updates.yaml):
# each case's old object is created for real, its new object sent with `kubectl replace
# --dry-run=server` and judged the same way, and the old object deleted again. Prints one line
# per mismatch and a summary; exits 1 on any mismatch.
#
#   e2e/validation/check-apiserver.sh KUBECONFIG KUBECTL
#
# Before the cases it server-side applies weft's CRDs from crds/generated (the ones this
# checkout generates) and waits until they are Established, and creates the namespace
# weft-validation. Whatever of these did not exist before is removed again at the end
# (KEEP=1 keeps it). VERBOSE=1 prints the API server's answer to every case. Needs python3
# with PyYAML to split the table.
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 KUBECONFIG KUBECTL" >&2
  exit 2
fi
KC=$1
KUBECTL=$2
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
NS=weft-validation
k() { "$KUBECTL" --kubeconfig "$KC" "$@"; }

python3 -c 'import yaml' 2>/dev/null || { echo "$0: needs python3 with PyYAML (Debian: python3-yaml)" >&2; exit 2; }

WORK=$(mktemp -d)
created_crds=()
created_ns=""
cleanup() {
  if [ "${KEEP:-0}" != 1 ]; then
    [ -n "$created_ns" ] && k delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
    for crd in "${created_crds[@]}"; do
      k delete crd "$crd" --wait=false >/dev/null 2>&1 || true
    done
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

for f in "$ROOT"/crds/generated/*.yaml; do
  crd=$(basename "$f" .yaml)
  k get crd "$crd" >/dev/null 2>&1 || created_crds+=("$crd")
done
k apply --server-side --force-conflicts --field-manager=weft-validation -f "$ROOT/crds/generated/" >/dev/null
for f in "$ROOT"/crds/generated/*.yaml; do
  k wait --for=condition=Established "crd/$(basename "$f" .yaml)" --timeout=60s >/dev/null
done
if ! k get namespace "$NS" >/dev/null 2>&1; then
  k create namespace "$NS" >/dev/null
  created_ns=1
fi

# One JSON file per case, and a list: name, expect, field.
python3 - "$HERE/cases.yaml" "$WORK" <<'PY'
import json, sys, yaml
cases = yaml.safe_load(open(sys.argv[1]))
with open(sys.argv[2] + "/index", "w") as index:
    for i, c in enumerate(cases):
        with open("%s/%03d.json" % (sys.argv[2], i), "w") as f:
            json.dump(c["object"], f)
        index.write("%03d\t%s\t%s\t%s\n" % (i, c["name"], c["expect"], c.get("field") or "-"))
PY

# The same for the updates: old and new object per case.
python3 - "$HERE/updates.yaml" "$WORK" <<'PY'
import json, sys, yaml
cases = yaml.safe_load(open(sys.argv[1]))
with open(sys.argv[2] + "/updates", "w") as index:
    for i, c in enumerate(cases):
        for side in ("old", "new"):
            with open("%s/u%03d.%s.json" % (sys.argv[2], i, side), "w") as f:
                json.dump(c[side], f)
        index.write("u%03d\t%s\t%s\t%s\n" % (i, c["name"], c["expect"], c.get("field") or "-"))
PY

# Established CRDs can take a moment before their schema is served for validation.
sleep 2

total=0
failed=0
# judge NAME EXPECT FIELD GOT OUTPUT: the API server's verdict must be the expected one, and a
# rejection must name the field.
judge() {
  local name=$1 expect=$2 field=$3 got=$4 out
  out=$(printf '%s' "$5" | tr '\n' ' ')
  [ "${VERBOSE:-0}" = 1 ] && echo "$name ($expect): $out"
  if [ "$got" != "$expect" ]; then
    failed=$((failed + 1))
    echo "MISMATCH $name: expected $expect, the API server said $got: $out"
  elif [ "$expect" = reject ] && [[ "$out" != *"$field"* ]]; then
    failed=$((failed + 1))
    echo "MISMATCH $name: rejected, but the message does not name $field: $out"
  fi
}

while IFS=$'\t' read -r i name expect field; do
  total=$((total + 1))
  if out=$(k create --dry-run=server -o name -f "$WORK/$i.json" 2>&1); then
    got=accept
  else
    got=reject
  fi
  judge "$name" "$expect" "$field" "$got" "$out"
done <"$WORK/index"

while IFS=$'\t' read -r i name expect field; do
  total=$((total + 1))
  if ! out=$(k create -o name -f "$WORK/$i.old.json" 2>&1); then
    failed=$((failed + 1))
    echo "MISMATCH $name: the old object was refused: $(printf '%s' "$out" | tr '\n' ' ')"
    continue
  fi
  if out=$(k replace --dry-run=server -o name -f "$WORK/$i.new.json" 2>&1); then
    got=accept
  else
    got=reject
  fi
  k delete --wait=false -f "$WORK/$i.old.json" >/dev/null 2>&1 || true
  judge "$name" "$expect" "$field" "$got" "$out"
done <"$WORK/updates"

echo "validation table against the API server: $((total - failed)) passed, $failed failed"
[ "$failed" -eq 0 ]

# Helpers of the end-to-end scripts (e2e/cluster/test.sh, e2e/clients/test.sh), sourced by them.
# A test is a shell function that returns non-zero on failure; `run NAME FUNCTION` runs it unless
# ONLY names others, prints PASS/FAIL with its duration, counts it, and on failure calls the
# script's `dump_state NAME`. ALWAYS (space-separated names) run whatever ONLY says.
passed=0
failed=0
failures=()
# How long `eventually` waits between tries (seconds).
POLL=${POLL:-1}

log() { printf '  %s\n' "$*" >&2; }
not() { ! "$@"; }
fail() { log "FAILED: $*"; return 1; }
# expect DESCRIPTION COMMAND...: the command must succeed.
expect() { local what=$1; shift; if "$@"; then log "ok: $what"; else fail "$what"; fi; }
# eventually SECONDS DESCRIPTION COMMAND...: the command must succeed within SECONDS.
eventually() {
  local t=$1 what=$2; shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= end)); then fail "$what (after ${t}s)"; return 1; fi
    sleep "$POLL"
  done
  log "ok: $what"
}

run() { # name function
  local name=$1 fn=$2
  if [ -n "${ONLY:-}" ] && [[ " ${ALWAYS:-} " != *" $name "* ]] && [[ " $ONLY " != *" $name "* ]]; then
    return
  fi
  echo "=== $name"
  local start=$SECONDS
  if "$fn"; then
    echo "PASS $name ($((SECONDS - start)) s)"
    passed=$((passed + 1))
  else
    echo "FAIL $name ($((SECONDS - start)) s)"
    failed=$((failed + 1))
    failures+=("$name")
    dump_state "$name"
  fi
}

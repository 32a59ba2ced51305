#!/usr/bin/env bash
# Sum cargo's per-binary "test result:" lines into one closing line, so the
# run ends with the total rather than the last (often empty) doc-test binary.
#   scripts/test-summary.sh LOG
set -euo pipefail
awk '/^test result:/ {
       for (i = 1; i <= NF; i++) {
         if ($(i) ~ /^passed;?$/) passed += $(i-1)
         if ($(i) ~ /^failed;?$/) failed += $(i-1)
         if ($(i) ~ /^ignored;?$/) ignored += $(i-1)
       }
       binaries++
     }
     END {
       if (binaries == 0) { print "no test results found" > "/dev/stderr"; exit 1 }
       printf "tests: %d passed, %d failed, %d skipped\n", passed, failed, ignored
       if (failed > 0) exit 1
     }' "$1"

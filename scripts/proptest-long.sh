#!/usr/bin/env bash
# The property tests of tests/props (config parser, key parser, SSE meter, WireGuard ingress)
# with many more cases than the suite runs (it runs 64 per property, a few seconds):
#
#   bash scripts/proptest-long.sh            # 20,000 cases per property (release build)
#   PROPTEST_CASES=200000 bash scripts/proptest-long.sh
#
# A failure prints the shrunk input that breaks the property; nothing is written to the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
export PROPTEST_CASES=${PROPTEST_CASES:-20000}
echo "property tests, $PROPTEST_CASES cases each"
cargo test --release --test props -- --test-threads="${TEST_THREADS:-2}"

#!/bin/sh
# Runs the attack cells against the crate as it was at 8ef371a, before read-ahead was bounded
# in real memory (aad9861) and before detached_limit (88a9bc1): the cells that guard those
# fixes fail there. A scratch copy of this working tree gets 8ef371a's src/; the calls the
# old crate lacks (detached_limit, detached_counts) are stubbed out in the copy's server
# process, so the detached route runs unbounded and reports no counts.
#
#   tests/attack/before_the_fixes.sh                          # every cell
#   tests/attack/before_the_fixes.sh one_byte::h1_one_byte_chunks
#
# CARGO_TARGET_DIR is shared with the normal build if set (only the crate is rebuilt).
set -eu
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
# One fixed place, so that repeated runs reuse the build.
scratch="${TMPDIR:-/tmp}/tower-cancel-8ef371a"
rm -rf "$scratch"
mkdir -p "$scratch"
(cd "$repo" && git ls-files -co --exclude-standard | tar -cf - -T -) | tar -xf - -C "$scratch"
rm -rf "$scratch/src"
git -C "$repo" archive 8ef371a src | tar -xf - -C "$scratch"
app="$scratch/tests/attack/app.rs"
sed -i -e 's/\.detached_limit(config\.detached_limit)//' \
    -e 's/detached\.detached_counts()/NoCounts { running: 0, refused: 0 }/' "$app"
printf '\n/// 8ef371a has no detached_counts.\nstruct NoCounts {\n    running: usize,\n    refused: u64,\n}\n' >>"$app"
# A package of another name, so that its build never passes for this one's in a shared
# target directory (the test code still says `tower_cancel`).
sed -i -e 's/^name = "tower-cancel"$/name = "tower-cancel-8ef371a"/' \
    -e 's/^tower-cancel = { path = "\."/tower-cancel = { package = "tower-cancel-8ef371a", path = "."/' \
    "$scratch/Cargo.toml"
printf '\n[lib]\nname = "tower_cancel"\n' >>"$scratch/Cargo.toml"
cd "$scratch"
cargo test --test attack -- --nocapture --test-threads=1 "$@"

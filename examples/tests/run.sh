#!/bin/sh
# The example app's test suite: plain shell checks over the assembled tree.
set -e
cd /srv/app
fail() { echo "FAIL: $*" >&2; exit 1; }
n=$(find vendor -name '*.php' | wc -l)
[ "$n" -ge 200 ] || fail "expected at least 200 vendor files, found $n"
grep -q 'kiln example app OK' src/lib/Greeting.php || fail "greeting changed"
grep -q 'bundle' public/app.js || fail "bundle header missing"
[ "$(cat public/modules.txt)" -ge 200 ] || fail "node_modules incomplete"
grep -q 'kiln extension for PHP' /usr/local/lib/php/extensions/kiln.so || fail "extension not built"
[ "$APP_ENV" = development ] || fail "APP_ENV is $APP_ENV"
echo "tests passed: $n vendor files"
echo "kiln example app OK"

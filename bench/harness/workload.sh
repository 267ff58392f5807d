#!/usr/bin/env bash
# Writes bench/run's workload into DIR, deterministically (no randomness beyond a seeded awk
# generator, no timestamps in contents): a PHP + JS project of the shape CI runners build.
#
#   bench/harness/workload.sh DIR [real|small]
#
# real (the default of bench/run builds), FROM a Debian 12 minbase image:
#   composer-deps  RUN makes ~15,000 files / ~158 MB (300 packages x 50 files, 2-19 KB each)
#   npm-deps       RUN makes ~20,000 files / ~74 MB (1,000 packages x 19 modules + package.json)
#   php-ext        a CPU-bound "compile" (gzip -9 of 96 MB of generated text)
#   app            COPY --from each of the three, a 2,000-file source tree, a RUN over the tree
#   release/test   release: labels and user; test: COPY tests/ + RUN the tests
# small (quick runs, FROM busybox): the same stages at about 1/20 of the size.
#
# Generated file contents are two thirds hex digits and one third repeated source lines (gzip
# -6 takes them to about 40 %, as it does vendored code), from awk's rand() seeded per
# stage, so every run makes the same bytes. The one-file edits of bench/run touch
# src/Controller.php (edit 1) and src/Module0/Class0.php (edit 2, 3, ...).
set -euo pipefail
DIR=${1:?usage: workload.sh DIR [real|small]}
SIZE=${2:-real}
case "$SIZE" in
  real)  COMPOSER_PKGS=300; COMPOSER_FILES=50; COMPOSER_MIN=2048; COMPOSER_MAX=19000
         NPM_PKGS=1000;     NPM_FILES=19;      NPM_MIN=600;     NPM_MAX=6200
         SRC_DIRS=100; SRC_FILES=20; COMPILE_MB=96 ;;
  small) COMPOSER_PKGS=60;  COMPOSER_FILES=25; COMPOSER_MIN=1024; COMPOSER_MAX=8000
         NPM_PKGS=100;      NPM_FILES=10;      NPM_MIN=300;      NPM_MAX=3000
         SRC_DIRS=20;  SRC_FILES=20; COMPILE_MB=4 ;;
  *) echo "workload.sh: SIZE must be real or small, not $SIZE" >&2; exit 2 ;;
esac
rm -rf "$DIR"
mkdir -p "$DIR"/{src,assets,ext,tests,bin,tools}
cd "$DIR"

for ((p = 0; p < COMPOSER_PKGS; p++)); do echo "vendor$((p % 37))/package$p"; done > composer.lock
echo '{"name": "kiln/bench-app", "require": {"php": ">=8.2"}}' > composer.json
for ((p = 0; p < NPM_PKGS; p++)); do
  if ((p % 5 == 0)); then echo "@scope$((p % 11))/mod$p"; else echo "mod$p"; fi
done > package-lock.json
echo '{"name": "bench-app", "private": true}' > package.json

# The dependency "installer": one awk program (mawk in Debian, busybox awk in small).
cat > tools/gen.awk <<'AWK'
# awk -v lock=FILE -v out=DIR -v kind=php|js -v files=N -v minb=B -v maxb=B -v seed=S -f gen.awk
# awk -v stream_mb=N -v seed=S -f gen.awk        (generated text on standard output)
function hexline(   s, i) {
  s = ""
  for (i = 0; i < 8; i++) s = s sprintf("%08x", int(rand() * 2147483648))
  return s
}
function body(path, size, head,   n, line) {
  printf "%s", head > path
  n = length(head)
  while (n < size) {
    if (rand() < 0.34) line = text[int(rand() * 8)]
    else line = "    '" hexline() "',\n"
    printf "%s", line > path
    n += length(line)
  }
  close(path)
}
BEGIN {
  srand(seed)
  text[0] = "    public function handle(Request $request): Response\n"
  text[1] = "    {\n        return $this->container->get(static::class);\n    }\n"
  text[2] = "    /** @var array<string, mixed> */\n"
  text[3] = "    private const VERSION = '1.0.0';\n"
  text[4] = "        if ($value === null) { throw new \\InvalidArgumentException('value'); }\n"
  text[5] = "module.exports.default = function (a, b) { return a + b; };\n"
  text[6] = "    // SPDX-License-Identifier: MIT\n"
  text[7] = "        foreach ($items as $key => $item) { $out[$key] = $item; }\n"
  if (stream_mb > 0) {
    n = 0
    while (n < stream_mb * 1048576) { line = hexline() "\n"; printf "%s", line; n += length(line) }
    exit
  }
  while ((getline pkg < lock) > 0) {
    dir = out "/" pkg
    system("mkdir -p " dir (kind == "php" ? "/src" : "/lib"))
    for (f = 0; f < files; f++) {
      size = minb + int(rand() * (maxb - minb))
      if (kind == "php") body(dir "/src/File" f ".php", size, "<?php\n// " pkg " file " f "\nnamespace Vendor;\n\nreturn [\n")
      else body(dir "/lib/part" f ".js", size, "'use strict';\n// " pkg " part " f "\nmodule.exports = [\n")
    }
    if (kind == "js") { printf "{\"name\": \"%s\", \"version\": \"1.0.%d\"}\n", pkg, npkg++ > (dir "/package.json"); close(dir "/package.json") }
  }
}
AWK

for ((d = 0; d < SRC_DIRS; d++)); do
  mkdir -p "src/Module$d"
  for ((f = 0; f < SRC_FILES; f++)); do
    printf '<?php\nnamespace App\\Module%d;\n\nuse App\\Contracts\\Handler;\n\n/**\n * Handles step %d of module %d.\n */\nfinal class Class%d implements Handler\n{\n    public function __construct(private readonly int $factor = %d) {}\n\n    public function handle(int $x): int\n    {\n        if ($x < 0) {\n            throw new \\InvalidArgumentException("negative input to module %d");\n        }\n        return $x * $this->factor + %d;\n    }\n}\n' \
      "$d" "$f" "$d" "$f" "$f" "$d" "$d" > "src/Module$d/Class$f.php"
  done
done
printf '<?php\nnamespace App;\n\nfinal class Controller\n{\n    public function index(): string { return "hello"; }\n}\n' > src/Controller.php
for ((a = 0; a < 20; a++)); do printf 'export function widget%d(el) { el.dataset.w = "%d"; }\n' "$a" "$a" > "assets/widget$a.js"; done
for ((c = 0; c < 12; c++)); do printf '#include "php.h"\n/* kiln ext unit %d */\nint kiln_unit_%d(int x) { return x * %d; }\n' "$c" "$c" "$c" > "ext/unit$c.c"; done
printf '#!/bin/sh\nexec php -S 0.0.0.0:8080 -t /srv/app/public\n' > bin/start
printf '#!/bin/sh\nset -e\nn=$(grep -rl "final class" /srv/app/src | wc -l)\necho "checked $n classes"\n[ "$n" -gt 0 ]\n' > tests/run.sh

cat > Dockerfile <<DOCKERFILE
# syntax=docker/dockerfile:1
# Workload of kiln's bench/run ($SIZE): generated by bench/harness/workload.sh.
ARG BASE_IMAGE=debian:bookworm

FROM \${BASE_IMAGE} AS composer-deps
WORKDIR /deps
COPY composer.json composer.lock tools/gen.awk ./
RUN awk -v lock=composer.lock -v out=vendor -v kind=php -v files=$COMPOSER_FILES \\
        -v minb=$COMPOSER_MIN -v maxb=$COMPOSER_MAX -v seed=1 -f gen.awk && \\
    printf '<?php\n// autoloader\n' > vendor/autoload.php

FROM \${BASE_IMAGE} AS npm-deps
WORKDIR /deps
COPY package.json package-lock.json tools/gen.awk ./
RUN awk -v lock=package-lock.json -v out=node_modules -v kind=js -v files=$NPM_FILES \\
        -v minb=$NPM_MIN -v maxb=$NPM_MAX -v seed=2 -f gen.awk
COPY assets/ ./assets/
RUN mkdir -p public && cat assets/*.js > public/app.js && find node_modules -name '*.js' | wc -l > public/modules.txt

FROM \${BASE_IMAGE} AS php-ext
WORKDIR /build
COPY ext/ ./ext/
COPY tools/gen.awk ./
RUN mkdir -p modules && \\
    { cat ext/*.c; awk -v stream_mb=$COMPILE_MB -v seed=3 -f gen.awk; } | gzip -9 > /tmp/kiln.gz && \\
    head -c 2097152 /tmp/kiln.gz > modules/kiln.so && sha256sum /tmp/kiln.gz > modules/kiln.so.sha256 && rm /tmp/kiln.gz

FROM \${BASE_IMAGE} AS app
WORKDIR /srv/app
COPY --from=composer-deps /deps/vendor ./vendor
COPY --from=npm-deps /deps/node_modules ./node_modules
COPY --from=npm-deps /deps/public ./public
COPY --from=php-ext /build/modules/ /usr/local/lib/php/extensions/
COPY src/ ./src/
COPY bin/ ./bin/
RUN n=\$(find . -type f | wc -l) && echo "\$n" > FILES

FROM app AS release
LABEL org.opencontainers.image.title="kiln-bench"
USER 1000:1000
CMD ["sh", "/srv/app/bin/start"]

FROM app AS test
COPY tests/ ./tests/
RUN sh tests/run.sh
DOCKERFILE
echo "workload ($SIZE): $(find . -type f | wc -l) files in the context; dependency stages make ~$((COMPOSER_PKGS * COMPOSER_FILES)) + ~$((NPM_PKGS * (NPM_FILES + 1))) files"

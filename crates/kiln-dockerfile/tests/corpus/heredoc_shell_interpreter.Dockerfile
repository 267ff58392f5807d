FROM a
RUN <<EOF bash -ex
set -e
echo hi
EOF

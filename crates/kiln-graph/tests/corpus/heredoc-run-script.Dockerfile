FROM busybox
RUN <<EOF
set -e
echo one
EOF

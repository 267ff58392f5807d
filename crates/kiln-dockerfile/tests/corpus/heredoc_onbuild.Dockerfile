FROM a
ONBUILD RUN <<EOF
echo onbuild
EOF

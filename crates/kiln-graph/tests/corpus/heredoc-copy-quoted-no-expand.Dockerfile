FROM busybox
ARG WHO=corpus
COPY <<"EOF" /greeting
hello $WHO
EOF

FROM a
RUN <<EOF
echo crlf
EOF

FROM a
COPY <<EOF /app/config.ini
[main]
key=value
EOF

FROM a
COPY --chmod=755 <<EOF run.sh /usr/local/bin/
#!/bin/sh
echo run
EOF

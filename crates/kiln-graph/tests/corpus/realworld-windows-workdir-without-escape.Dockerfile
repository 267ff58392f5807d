# BuildKit v0.24 builds this into /C:app/rel.txt: the default escape turns C:\app into C:app
FROM scratch
WORKDIR C:\app
COPY <<EOF rel.txt
hi
EOF

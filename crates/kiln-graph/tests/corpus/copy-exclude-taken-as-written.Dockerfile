FROM busybox
ARG PAT=*.md
COPY --exclude=$PAT --chmod=${MODE:-0640} --chown=${OWNER:-1:2} . /app/

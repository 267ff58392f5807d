FROM a
COPY --chown=app:app --chmod=0755 entry.sh /

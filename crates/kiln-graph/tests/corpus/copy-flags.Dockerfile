FROM busybox
COPY --chown=app:app --chmod=755 --link bin/ /usr/local/bin/

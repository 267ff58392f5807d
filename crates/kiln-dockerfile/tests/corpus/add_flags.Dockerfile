FROM a
ADD --chown=1000:1000 --chmod=644 --link src/ /app/

FROM a
USER app:app

FROM a
VOLUME /data /logs

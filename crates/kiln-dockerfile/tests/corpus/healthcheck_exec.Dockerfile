FROM a
HEALTHCHECK CMD ["curl", "-f", "http://localhost/"]

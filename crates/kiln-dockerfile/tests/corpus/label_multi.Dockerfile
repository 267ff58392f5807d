FROM a
LABEL org.opencontainers.image.title="My App" version=1.0 \
      description='multi word'

FROM a
LABEL description="Ünïcödé ✓"
RUN echo "日本語"

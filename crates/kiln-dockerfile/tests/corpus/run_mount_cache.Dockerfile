FROM a
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked pip install -r req.txt

FROM a
RUN --mount=from=tools$,target=/t --mount=from=,target=/c ls
COPY --from=a$ /x /y

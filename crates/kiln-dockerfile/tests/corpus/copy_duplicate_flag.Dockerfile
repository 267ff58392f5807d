FROM a
COPY --from=a --from=b x y

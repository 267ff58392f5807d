FROM a AS tools
FROM a
ARG STAGE=tools
COPY --from=$STAGE /x /y

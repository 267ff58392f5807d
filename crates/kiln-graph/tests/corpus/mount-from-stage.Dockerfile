FROM busybox AS tools
RUN echo tool > /tool
FROM busybox
RUN --mount=from=tools,target=/t cat /t/tool

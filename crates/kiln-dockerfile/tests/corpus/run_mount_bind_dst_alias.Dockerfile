FROM a
RUN --mount=type=bind,src=.,dst=/src ls /src

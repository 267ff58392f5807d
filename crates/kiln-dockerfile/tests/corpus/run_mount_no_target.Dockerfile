FROM a
RUN --mount=type=cache,id=x ls
RUN --mount=type=bind,target=rel ls rel
RUN --mount=from=b ls
RUN --mount=ro ls

FROM a
RUN --mount=type=bind,source=go.sum,target=go.sum,from=deps,rw go mod download

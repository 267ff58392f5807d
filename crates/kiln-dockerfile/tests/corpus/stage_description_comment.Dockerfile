# builds the binary
FROM golang AS build
# the runtime image
FROM alpine AS runtime

FROM alpine
SHELL ["/bin/ash", "-eo", "pipefail", "-c"]
CMD echo one
FROM alpine
CMD echo two

FROM ubuntu:24.04
RUN \
  --mount=target=/var/cache/apt,type=cache,sharing=locked \
  # a comment between flags
  --mount=type=tmpfs,target="/tmp/x" \
  <<HEREDOC
    apt update
    echo done
HEREDOC

FROM busybox AS home
ENV HOME=/app
WORKDIR $HOME

FROM busybox AS argdir
ARG DIR=/srv
WORKDIR ${DIR}/x

FROM busybox AS rel
ENV D=rel
WORKDIR $D
WORKDIR again

FROM busybox AS unset
WORKDIR $NOPE/x

FROM rel AS child
WORKDIR child

FROM busybox AS first
WORKDIR first

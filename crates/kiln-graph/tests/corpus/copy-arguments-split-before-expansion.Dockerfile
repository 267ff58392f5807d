FROM busybox
ARG EMPTY
ARG TWO="a.txt b.txt"
WORKDIR /w
COPY a.txt $EMPTY
COPY $EMPTY /ctx/
COPY $TWO /d/
ADD ["$EMPTY", "/json/"]

FROM busybox AS base
SHELL ["/bin/sh", "-c"]
CMD echo hi

FROM base
ENTRYPOINT top

FROM busybox
CMD echo plain
CMD ["a"]
HEALTHCHECK CMD true
HEALTHCHECK NONE

FROM busybox
SHELL ["/bin/ash", "-eo", "pipefail", "-c"]
RUN echo hi | cat
CMD echo shell form

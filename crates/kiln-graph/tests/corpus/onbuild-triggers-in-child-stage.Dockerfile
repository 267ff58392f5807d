FROM busybox AS parent
ONBUILD RUN echo triggered
FROM parent
RUN echo own

# escape=`
FROM busybox
RUN echo a `
    b
ENV P=C:\path

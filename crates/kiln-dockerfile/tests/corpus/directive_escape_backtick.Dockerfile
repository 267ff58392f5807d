# escape=`
FROM a
RUN echo one `
    two
COPY C:\src C:\dst

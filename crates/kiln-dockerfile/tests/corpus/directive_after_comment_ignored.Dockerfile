# hello
# escape=`
FROM a
RUN echo `

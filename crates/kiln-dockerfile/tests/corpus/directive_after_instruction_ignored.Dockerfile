FROM a
# escape=`
RUN echo `

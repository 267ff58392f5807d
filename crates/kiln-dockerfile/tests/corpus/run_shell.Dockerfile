FROM a
RUN echo hello && ls -l

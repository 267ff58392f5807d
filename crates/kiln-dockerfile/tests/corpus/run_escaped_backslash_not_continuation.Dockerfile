FROM a
RUN echo a\\
RUN echo b

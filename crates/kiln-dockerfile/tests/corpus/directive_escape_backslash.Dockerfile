# escape=\
FROM a
RUN echo a \
 b

FROM a
RUN echo crlf \
  more

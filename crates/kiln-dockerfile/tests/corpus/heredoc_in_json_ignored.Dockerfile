FROM a
RUN ["cat", "<<EOF"]
RUN echo after

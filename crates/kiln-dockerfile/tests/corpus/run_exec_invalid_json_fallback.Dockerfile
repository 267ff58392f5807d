FROM a
RUN ["echo", 'single']

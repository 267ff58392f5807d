# leading comment

   # indented comment
FROM a

# between
RUN echo ok

FROM alpine
RUN --mount=target=. \ 
  echo one; \	
  echo two

FROM busybox AS build
RUN echo build > /out
FROM busybox AS final
COPY --from=build /out /out
CMD ["cat", "/out"]

FROM busybox AS base
CMD ["base"]
FROM base
ENTRYPOINT ["/e"]

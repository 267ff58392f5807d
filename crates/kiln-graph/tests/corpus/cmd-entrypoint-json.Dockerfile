FROM busybox
ENTRYPOINT ["/bin/app"]
CMD ["--help"]

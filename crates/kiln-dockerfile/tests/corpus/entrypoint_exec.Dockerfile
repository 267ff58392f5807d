FROM a
ENTRYPOINT ["/docker-entrypoint.sh"]
CMD ["serve"]

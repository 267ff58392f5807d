FROM a
ENTRYPOINT exec nginx -g 'daemon off;'

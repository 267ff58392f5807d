FROM busybox
RUN <<SCRIPT
#!/bin/sh
echo from a shebang script
SCRIPT

FROM busybox
ENV FILE=archive.tar.gz
ENV STEM=${FILE%%.*} EXT=${FILE#*.} DEF=${UNSET:-fallback} ALT=${FILE:+set} SUB=${FILE/tar/zip}

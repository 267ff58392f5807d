# corpus-target: nope
FROM busybox AS a

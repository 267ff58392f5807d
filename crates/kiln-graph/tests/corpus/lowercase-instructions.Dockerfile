from busybox as base
run echo lower
env A=1

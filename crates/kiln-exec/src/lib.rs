//! Runs one process in a container on a prepared rootfs: namespaces, mounts, capabilities,
//! seccomp, users, RUN --mount types; a runc backend for differential testing.

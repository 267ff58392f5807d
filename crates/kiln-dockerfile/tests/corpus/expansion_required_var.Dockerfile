FROM a
ENV A=${UNSET:?must be set}

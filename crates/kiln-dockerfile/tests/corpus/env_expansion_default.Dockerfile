FROM a
ENV X=${V:-fallback} Y=${UNSET:-fallback}

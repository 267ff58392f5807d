FROM a
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

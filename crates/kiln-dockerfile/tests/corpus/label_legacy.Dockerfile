FROM a
LABEL maintainer someone@example.com

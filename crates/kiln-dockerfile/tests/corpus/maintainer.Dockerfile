FROM a
MAINTAINER Jane Doe <jane@example.com>

FROM a
FOO bar

FROM a
RUNN make

#  SYNTAX = docker/dockerfile:1
#Escape=`
FROM a

# syntax = docker/dockerfile:1.4
# escape=`
FROM rust:1.64 AS base
RUN echo C:\temp\ `
  && echo next

FROM alpine as base

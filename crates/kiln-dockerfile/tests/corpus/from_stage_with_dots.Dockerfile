FROM alpine AS my-stage.v1_x

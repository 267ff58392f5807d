//! Build-graph types, and the frontend that lowers a Dockerfile AST plus build options into
//! a graph of vertices (image source, local context, exec, file copy, image-config edits).

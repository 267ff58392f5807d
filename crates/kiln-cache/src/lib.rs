//! Remote layer cache: the registry cache format (one OCI manifest per ref), export and
//! import to registries and local OCI layouts.

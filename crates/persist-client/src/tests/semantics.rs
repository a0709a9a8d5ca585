//! Semantics the issue adds beyond the seed tests.

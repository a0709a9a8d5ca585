//! Tests of the public API (seed tests rewritten).

//! The bundled plugins (built by `just plugins` into plugins/dist) loaded by
//! the real proxy binary.
